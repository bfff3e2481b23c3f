"""Stage 2: fusion training. The diffusion UNet is frozen (a feature extractor); the reducers, CAIM
and decoder (`params['head']`) are trained with the fusion loss (DESIGN.md section 5).

The UNet comes from a stage-1 workdir (`init.unet_workdir`, EMA weights with `init.unet_ema`), a
PyTorch SR3 state_dict (`init.unet_torch`) or a flat npz (`init.unet_params`, e.g. the default
model's); the head may start from the released PyTorch head (`init.head_torch`) or a flat npz
(`init.head_params`), with a fresh Adam state. Previews: held-out pairs fused by the current head,
written as PNG.
"""
from __future__ import annotations

import logging
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from dmfuse_jax import compilation
from dmfuse_jax.data.fusion_pairs import PairedPatchSource, preview_pairs, set_pairs, split_pairs
from dmfuse_jax.data.images import from_model_range
from dmfuse_jax.data.pipeline import resolve_path
from dmfuse_jax.errors import UserError
from dmfuse_jax.models.builders import build_dmfuse
from dmfuse_jax.training.fusion_loss import fusion_loss_from_config
from dmfuse_jax.data.images import image_grid
from dmfuse_jax.sharding import put_tree

log = logging.getLogger(__name__)


def check_unet_workdir(workdir: str, config) -> None:
    """init.unet_workdir must be a stage-1 workdir whose model.unet config equals this config's."""
    from dmfuse_jax.workdir import load_workdir_config

    path = resolve_path(workdir, "init.unet_workdir")
    theirs = load_workdir_config(path)
    if theirs.get("stage") != "pretrain":
        raise UserError(f"{path}: init.unet_workdir must be a stage-1 ('pretrain') workdir, "
                        f"it is stage {theirs.get('stage')!r}")
    mine, other = config.model.unet.to_dict(), theirs.model.unet.to_dict()
    diff = [f"{k}: {other.get(k)!r} there vs {mine.get(k)!r} here" for k in sorted(set(mine) | set(other))
            if k != "attention_impl" and _norm(mine.get(k)) != _norm(other.get(k))]
    if diff:
        raise UserError(f"{path}/config.json: its model.unet differs from this config's: " + "; ".join(diff))


def _norm(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v


class FusionStage:
    """Trains `params` = {'head': ...}; `frozen` = {'unet': ...}."""

    name = "fusion"

    def __init__(self, config):
        self.config = config
        self.model = build_dmfuse(config)
        self.patch = int(config.data.patch_size)
        if self.patch % self.model.unet.total_stride:
            raise UserError(f"data.patch_size {self.patch} must be a multiple of the UNet stride "
                            f"{self.model.unet.total_stride}")
        self._preview_fn = None
        self._previews = None
        # the batch then carries vi_chroma
        self._colour = any(float(config.loss.get(k, 0.0)) > 0 for k in ("w_colour", "w_edge"))

    # -- data
    def _pairs(self):
        d = self.config.data
        if d.get("sets"):  # a written-down split over several folders; previews: first held-out pair per set
            train, held = set_pairs(d.sets.to_dict(), resolve_path)
            firsts = {name.split("/")[0]: (name, a, b) for name, a, b in reversed(held)}
            return train, [firsts[k] for k in d.sets]
        return split_pairs(resolve_path(d.ir_dir, "data.ir_dir"), resolve_path(d.vi_dir, "data.vi_dir"),
                           int(d.get("num_holdout", 0)), int(d.get("max_pairs", 0)))

    def train_source(self, workdir):
        d = self.config.data
        train, held = self._pairs()
        source = PairedPatchSource(train, patch=self.patch, step=int(d.patch_step),
                                   input_range=self.config.model.input_range, chroma=self._colour)
        self._previews = held
        return source, None

    def example_batch(self, batch: int) -> dict:
        z = jnp.zeros((batch, self.patch, self.patch, 1), jnp.float32)
        if self._colour:
            return {"ir": z, "vi": z, "vi_chroma": jnp.zeros((batch, self.patch, self.patch, 3), jnp.float32)}
        return {"ir": z, "vi": z}

    # -- model
    def init_params(self, key):
        z = jnp.zeros((1, self.patch, self.patch, 1), jnp.float32)
        p = self.model.init({"params": key, "noise": key}, z, z, method=self.model.init_all)["params"]
        return {"head": p["head"]}, {"unet": p["unet"]}

    def load_pretrained(self, state, shardings):
        """Fills the frozen UNet (and optionally the head) from disk."""
        init = self.config.init
        for part, keys in (("UNet", ("unet_workdir", "unet_torch", "unet_params")),
                           ("head", ("head_torch", "head_params"))):
            given = [k for k in keys if init.get(k)]
            if len(given) > 1:
                raise UserError(f"init.{given[0]} and init.{given[1]} both set: give one source for the {part}")
        from dmfuse_jax.inference.checkpoints import load_part

        unet_template = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state.frozen["unet"])
        if init.get("unet_workdir"):
            check_unet_workdir(init.unet_workdir, self.config)
        for key in ("unet_workdir", "unet_torch", "unet_params"):
            if init.get(key):
                path = resolve_path(init[key], f"init.{key}")
                unet = load_part(path, "unet", unet_template, key=f"init.{key}", what="this config's UNet",
                                 ema=bool(init.get("unet_ema", True)) if key == "unet_workdir" else None)
                state = state.replace(frozen={"unet": put_tree(unet, shardings.frozen["unet"])})
                log.info("frozen UNet from %s (init.%s)", path, key)
                break
        else:
            warnings.warn("init.unet_workdir, init.unet_torch and init.unet_params are empty: the frozen UNet "
                          "is randomly initialised, its features are meaningless (fine for tests only)",
                          stacklevel=2)
        head = None
        for key in ("head_torch", "head_params"):
            if init.get(key):
                path = resolve_path(init[key], f"init.{key}")
                template = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state.params["head"])
                head = {"head": load_part(path, "head", template, key=f"init.{key}", what="this config's fusion head")}
                log.info("fusion head from %s (init.%s; Adam starts fresh)", path, key)
        if head is not None:
            state = state.replace(params=put_tree(head, shardings.params),
                                  ema_params=put_tree(head, shardings.ema_params))
        return state

    def loss(self, params, frozen, batch, key):
        """batch['ir'], batch['vi']: (B, P, P, 1) in model range; batch['vi_chroma'] (B, P, P, 3) when
        loss.w_colour or loss.w_edge > 0. Returns (loss, metrics)."""
        fused = self.model.apply({"params": {**frozen, **params}}, batch["ir"], batch["vi"], rngs={"noise": key})
        loss, aux = fusion_loss_from_config(fused, batch["ir"], batch["vi"], self.config.loss,
                                            self.config.model.input_range, vi_chroma=batch.get("vi_chroma"))
        return loss, aux

    # -- previews
    def preview(self, trainer, state, step: int) -> None:
        """Held-out pairs fused with the current head: rows of [infrared | visible | fused]."""
        if not self._previews:
            return
        if not isinstance(self._previews, dict):
            self._previews = preview_pairs(self._previews, int(self.config.preview.get("size", 256)),
                                           self.model.unet.total_stride, self.config.model.input_range)
        if self._preview_fn is None:
            def fuse(params, frozen, ir, vi):
                return self.model.apply({"params": {**frozen, **params}}, ir, vi,
                                        rngs={"noise": jax.random.PRNGKey(0)})
            self._preview_fn = compilation.jit(fuse, out_shardings=trainer.replicated)
        ir, vi = self._previews["ir"], self._previews["vi"]
        fused = np.asarray(jax.device_get(self._preview_fn(state.params, state.frozen, ir, vi)))
        rows = np.concatenate([from_model_range(x, self.config.model.input_range) for x in (ir, vi, fused)],
                              axis=2)  # (N, s, 3s, 1)
        trainer.write_image(f"previews/step_{step:08d}.png", "previews", image_grid(rows, cols=1), step)
