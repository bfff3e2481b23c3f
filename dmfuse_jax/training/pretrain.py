"""Stage 1: DDPM pretraining of the SR3 UNet (DESIGN.md section 2).

Continuous noise level g ~ U[sqrt_acp_prev[t], sqrt_acp_prev[t-1]], t uniform, cosine schedule,
L2 (or L1) epsilon loss, dropout on. `init.unet_params` (a flat npz) starts from given params, with
a fresh Adam state. Previews: a grid of reverse-diffusion samples of the EMA UNet (`p_sample_loop`
respaced to `preview.sample_steps`), written as PNG.
"""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from dmfuse_jax import compilation
from dmfuse_jax.data.images import from_model_range, image_grid
from dmfuse_jax.data.pipeline import resolve_path
from dmfuse_jax.data.pretrain import ImageFolderSource, PretrainTransform, TfdsSource
from dmfuse_jax.diffusion.gaussian import ddpm_loss, p_sample_loop
from dmfuse_jax.errors import UserError
from dmfuse_jax.models.builders import build_schedule, build_unet

SOURCES = {
    "folder": lambda d, workdir: ImageFolderSource(resolve_path(d.root, "data.root"),
                                                   cache_path=Path(workdir) / "filelist.json"),
    "tfds": lambda d, workdir: TfdsSource(d.tfds_name, d.get("tfds_split", "train"), d.get("tfds_data_dir") or None),
}


class PretrainStage:
    """Trains `params` = the UNet params; nothing frozen."""

    name = "pretrain"

    def __init__(self, config):
        self.config = config
        self.unet = build_unet(config)
        self.schedule = build_schedule(config)
        self.size = int(config.model.unet.image_size)
        self._sampler = None

    # -- data
    def train_source(self, workdir):
        d = self.config.data
        if d.source not in SOURCES:
            raise UserError(f"unknown data.source {d.source!r} (expected one of {sorted(SOURCES)})")
        transform = PretrainTransform(self.size, self.unet.in_channels, d.get("color", "grey"),
                                      d.get("crop", "random_crop"), d.get("flip", True))
        return SOURCES[d.source](d, workdir), transform

    def example_batch(self, batch: int) -> dict:
        return {"image": jnp.zeros((batch, self.size, self.size, self.unet.in_channels), jnp.float32),
                "skipped": jnp.zeros((batch,), jnp.int32)}

    # -- model
    def init_params(self, key):
        x = jnp.zeros((1, self.size, self.size, self.unet.in_channels), jnp.float32)
        return self.unet.init({"params": key}, x, jnp.ones((1,)))["params"], {}

    def load_pretrained(self, state, shardings):
        """`init.unet_params` (a flat npz such as the default model's UNet, or any weights
        `inference.checkpoints.load_part` reads): params and EMA start from it, Adam from scratch."""
        path = self.config.get("init", {}).get("unet_params", "")
        if not path:
            return state
        from dmfuse_jax.inference.checkpoints import load_part
        from dmfuse_jax.sharding import put_tree

        path = resolve_path(path, "init.unet_params")
        template = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state.params)  # shapes only: multi-host safe
        unet = load_part(path, "unet", template, key="init.unet_params", what="this config's UNet")
        return state.replace(params=put_tree(unet, shardings.params),
                             ema_params=put_tree(unet, shardings.ema_params))

    def loss(self, params, frozen, batch, key):
        """batch['image']: (B, S, S, C) in [-1, 1]. Returns (loss, metrics)."""
        k_noise, k_drop = jax.random.split(key)

        def denoise(x_t, g):
            return self.unet.apply({"params": params}, x_t, g, train=True, rngs={"dropout": k_drop})

        loss, aux = ddpm_loss(denoise, batch["image"], k_noise, self.schedule,
                              self.config.diffusion.get("loss_type", "l2"))
        return loss, {"loss_diffusion": loss, **aux}

    # -- previews
    def preview(self, trainer, state, step: int) -> None:
        """Reverse-diffusion samples of the EMA UNet -> samples/step_XXXXXXXX.png (+ TensorBoard)."""
        p = self.config.preview
        n = int(p.get("num_samples", 4))
        if n <= 0:
            return
        shape = (n, self.size, self.size, self.unet.in_channels)
        if self._sampler is None:
            def sample(params, key):
                fn = lambda x, g: self.unet.apply({"params": params}, x, g)  # noqa: E731
                return p_sample_loop(fn, key, shape, self.schedule, num_steps=int(p.get("sample_steps", 25)))
            self._sampler = compilation.jit(sample, out_shardings=trainer.replicated)
        key = jax.random.PRNGKey(int(self.config.seed) + 7)
        x = np.asarray(jax.device_get(self._sampler(state.ema_params, key)))
        grid = image_grid(from_model_range(x, "-1_1"), cols=min(n, 8))  # DDPM images are in [-1, 1]
        trainer.write_image(f"samples/step_{step:08d}.png", "samples", grid, step)
