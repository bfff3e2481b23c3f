"""The whole DMFuse model: frozen diffusion feature extractor + fusion head, for any image size."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dmfuse_jax.data.images import luma
from dmfuse_jax.diffusion.gaussian import Schedule, q_sample
from dmfuse_jax.models.fusion_head import FusionHead
from dmfuse_jax.models.unet import UNet

def pad_to_multiple(x: jax.Array, multiple: int) -> jax.Array:
    """Reflect-pad H and W at the bottom/right up to multiples of `multiple`. (B, H, W, C)."""
    h, w = x.shape[1:3]
    ph, pw = -h % multiple, -w % multiple
    if ph == 0 and pw == 0:
        return x
    # Reflection needs pad < size; tiny inputs fall back to edge padding.
    mode = "reflect" if ph < h and pw < w else "edge"
    return jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), mode=mode)


def noisy_grid(key: jax.Array, ir: jax.Array, vi: jax.Array, schedule: Schedule,
               timesteps: Sequence[int], channels: int) -> tuple[jax.Array, jax.Array]:
    """Both modalities at every timestep: x_t (T, 2, B, H, W, channels) and g (T, 2, B), modality 0
    the infrared. Noise is drawn per entry in that (row-major) order, so with jax's partitionable
    threefry it is the same as drawing the flat (T * 2 * B, ...) array, and each image's noise can be
    made on the device that holds the image."""
    b = ir.shape[0]
    n_t = len(timesteps)
    x0 = jnp.stack([ir, vi]).astype(jnp.float32)  # (2, B, H, W, 1)
    x0 = jnp.repeat(x0, channels, axis=-1) if channels != 1 else x0
    x0 = jnp.broadcast_to(x0[None], (n_t,) + x0.shape)
    table = np.asarray(schedule.sqrt_alphas_cumprod_prev, np.float32)
    t = np.broadcast_to(np.asarray(timesteps)[:, None, None], (n_t, 2, b))
    lo, hi = jnp.asarray(table[t]), jnp.asarray(table[t - 1])
    k_g, k_eps = jax.random.split(key)
    g = lo + (hi - lo) * jax.random.uniform(k_g, lo.shape)
    eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
    return q_sample(x0, g, eps), g


def noisy_inputs(key: jax.Array, ir: jax.Array, vi: jax.Array, schedule: Schedule,
                 timesteps: Sequence[int], channels: int) -> tuple[jax.Array, jax.Array]:
    """Both modalities at every timestep, as one UNet batch.

    ir, vi: (B, H, W, 1). Returns x_t (T * 2 * B, H, W, channels), ordered t-major, then
    modality (infrared first), then image; and g (T * 2 * B,) drawn per entry from its step's interval.
    """
    x, g = noisy_grid(key, ir, vi, schedule, timesteps, channels)
    return x.reshape((-1,) + x.shape[3:]), g.reshape(-1)


class DMFuse(nn.Module):
    """fuse(ir, vi) for any size and batch.

    ir, vi: (B, H, W, 1 | 3) in model range (see `input_range`); a 3-channel input is reduced to
    its luma. Returns the fused image (B, H, W, 1), tanh range; H and W are reflect-padded to the
    UNet stride internally and cropped back.
    Params: {'unet': ..., 'head': ...}. RNG stream 'noise' drives the diffusion noise.
    """

    unet: UNet
    head: FusionHead
    schedule: Schedule
    timesteps: Sequence[int] = (5, 50, 100)

    def extract_features(self, ir: jax.Array, vi: jax.Array):
        """Frozen UNet taps of both modalities at every timestep, in ONE batched UNet call.

        ir, vi: (B, H, W, 1), H and W multiples of the UNet stride. Returns two lists (infrared,
        visible) of five arrays; level l has shape (B, H / 2^(l-1), W / 2^(l-1), len(timesteps) * C_l),
        timesteps concatenated in config order. Gradients stop here: nothing reaches the UNet.
        Noise (g and eps) comes from the 'noise' RNG stream: a fixed key gives a fixed output.
        """
        b, n_t = ir.shape[0], len(self.timesteps)
        x, g = noisy_grid(self.make_rng("noise"), ir, vi, self.schedule, self.timesteps, self.unet.in_channels)
        # The UNet batch is image-major (B, T, 2): a batch sharded over devices keeps each image's
        # 2 T passes on its own device (a t-major batch makes XLA move them between devices).
        x = jnp.moveaxis(x, 2, 0).reshape((b * n_t * 2,) + x.shape[3:])
        taps = self.unet(x, jnp.moveaxis(g, 2, 0).reshape(-1), taps=True)
        ir_feats, vi_feats = [], []
        for tap in taps:
            tap = jax.lax.stop_gradient(tap).reshape((b, n_t, 2) + tap.shape[1:])
            per_mod = jnp.concatenate([tap[:, i] for i in range(n_t)], axis=-1)  # (B, 2, h, w, T C)
            ir_feats.append(per_mod[:, 0])
            vi_feats.append(per_mod[:, 1])
        return ir_feats, vi_feats

    def diffusion_inputs(self, ir: jax.Array, vi: jax.Array):
        """The UNet batch (x_t, g) of `noisy_inputs` that `__call__` draws for (ir, vi) with the same
        'noise' key (grey, padded): for checking other implementations on identical noise."""
        s = self.unet.total_stride
        return noisy_inputs(self.make_rng("noise"), pad_to_multiple(luma(ir), s),
                            pad_to_multiple(luma(vi), s), self.schedule, self.timesteps,
                            self.unet.in_channels)

    def __call__(self, ir: jax.Array, vi: jax.Array) -> jax.Array:
        if ir.shape[:3] != vi.shape[:3]:
            raise ValueError(f"infrared {ir.shape} and visible {vi.shape} differ in batch or size")
        h, w = ir.shape[1:3]
        stride = self.unet.total_stride
        ir = pad_to_multiple(luma(ir), stride)
        vi = pad_to_multiple(luma(vi), stride)
        ir_feats, vi_feats = self.extract_features(ir, vi)
        return self.head(ir_feats, vi_feats)[:, :h, :w, :]

    def init_all(self, ir, vi):
        """Initialises every parameter (the UNet's full forward too, not only the tapped part)."""
        x = jnp.zeros(ir.shape[:3] + (self.unet.in_channels,), jnp.float32)
        self.unet(x, jnp.ones((ir.shape[0],)))
        return self(ir, vi)


def fuse_in_sequence(model: DMFuse, params, ir: jax.Array, vi: jax.Array, key: jax.Array) -> jax.Array:
    """`model.apply({'params': params}, ir, vi, rngs={'noise': key})` in less memory: the same noise
    and maths (to float rounding), the UNet run one (timestep, modality) pass at a time.

    ir, vi: (B, H, W, 1 | 3) as `DMFuse.__call__`; returns (B, H, W, 1). Under `lax.scan` over the
    len(timesteps) x 2 passes, each pass's five taps go straight into its share of the reducer's
    first convolution (a 3x3 conv of the timesteps' concatenated features is the sum of the convs
    of each timestep's features with its slice of the kernel), so neither the batched UNet's
    activations nor the (B, H, W, 3 C) concatenated taps are ever live: only one pass and the
    32-channel sums. The rest of the reducer (bias, ReLU, scSE), CAIM and the decoder follow as
    in `FusionHead`.
    """
    from dmfuse_jax.models.fusion_head import ChannelSpatialSE, reflect_pad

    h, w = ir.shape[1:3]
    b, n_t = ir.shape[0], len(model.timesteps)
    x_t, g = model.apply({"params": params}, ir, vi, rngs={"noise": key}, method=DMFuse.diffusion_inputs)
    unet, head, hp = model.unet, model.head, params["head"]
    n_red = head.num_levels - 1 if head.shared_last_reducer else head.num_levels
    reducer = [hp[f"en{min(level, n_red - 1)}"] for level in range(head.num_levels)]
    dt = head.dtype
    hs = [x_t.shape[1] >> level for level in range(head.num_levels)]
    ws = [x_t.shape[2] >> level for level in range(head.num_levels)]
    sums = [jnp.zeros((2, b, hh, ww, head.features), jnp.float32) for hh, ww in zip(hs, ws)]
    # passes in noisy_inputs' order: t-major, then modality (infrared first), then image
    t_of = jnp.repeat(jnp.arange(n_t), 2)
    m_of = jnp.tile(jnp.arange(2), n_t)

    def one(sums, xs):
        x, gg, t, m = xs
        taps = unet.apply({"params": params["unet"]}, x, gg, taps=True)
        out = []
        for level, (tap, s) in enumerate(zip(taps, sums)):
            kernel = reducer[level]["conv1"]["conv2d"]["kernel"]  # (3, 3, n_t C, features)
            c = tap.shape[-1]
            k_t = jax.lax.dynamic_slice_in_dim(kernel, t * c, c, axis=2)
            part = jax.lax.conv_general_dilated(
                reflect_pad(tap, 1).astype(dt), k_t.astype(dt), (1, 1), "VALID",
                dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=jnp.float32)
            out.append(s.at[m].add(part))
        return out, None

    xs = (x_t.reshape((2 * n_t, b) + x_t.shape[1:]), g.reshape(2 * n_t, b), t_of, m_of)
    sums, _ = jax.lax.scan(one, sums, xs)
    reduced = []
    for level, s in enumerate(sums):
        conv = reducer[level]["conv1"]["conv2d"]
        x = jax.nn.relu((s + conv["bias"].astype(jnp.float32)).astype(dt)).reshape((2 * b,) + s.shape[2:])
        reduced.append(ChannelSpatialSE(dtype=dt, param_dtype=head.param_dtype).apply(
            {"params": reducer[level]["scSE"]}, x))
    fused = head.apply({"params": hp}, [r[:b] for r in reduced], [r[b:] for r in reduced],
                       method=lambda m, a, v: m.decode(m.interact(a, v)))
    return fused[:, :h, :w, :]
