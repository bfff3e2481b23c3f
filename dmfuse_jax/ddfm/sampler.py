"""DDFM sampling: DDIM (eta 0) over a respaced schedule with the EM correction of x0 at every step.

The maths of MMIF-DDFM's `DDIM.p_sample` / `p_sample_loop` (guided_diffusion/gaussian_diffusion.py):
  eps = prior(x_t, t); x0 = clip(sqrt(1/acp) x_t - sqrt(1/acp - 1) eps, -1, 1)
  ycc = rgb2ycbcr(x0) / 255                 # skimage BT.601 on the [-1, 1] estimate as it is (quirk)
  ycc[Y] = EM_onestep(ycc[Y], I, V)          # I, V grey in [-1, 1]
  x0 = ycbcr2rgb(ycc * 255); eps = (sqrt(1/acp) x_t - x0) / sqrt(1/acp - 1)
  x_{t-1} = sqrt(acp_prev) x0 + sqrt(1 - acp_prev) eps
With eta 0 the variance (learned_range or fixed) never enters, so only the first 3 output channels
of a learn_sigma model are used. Result: `luminance(x_0)` min-max stretched (see `fused_luminance`).

Priors (`PRIORS`): 'guided_diffusion' is called with the original integer timestep
(`timestep_map[i]`, no rescaling); 'sr3' (the DMFuse UNet) with its continuous noise level
sqrt(alphas_cumprod[i]) over its own (cosine, 2000-step) schedule.

One step is `ddfm_step`; `sample` runs them all as ONE jitted `lax.scan`; `sample_chunk` runs `length`
steps from a dynamic start (one compile for every chunk), which is what the CLI uses to show progress.
Arrays NHWC: x (B, H, W, 3), I and V (B, H, W) grey in [-1, 1].
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dmfuse_jax import compilation
from dmfuse_jax.data.images import LUMA
from dmfuse_jax.ddfm.em import LAMB, RHO, EMState, em_initial, em_onestep
from dmfuse_jax.diffusion.respace import Tables

# skimage.color's BT.601 matrices (ycbcr_from_rgb and its float64 inverse).
YCBCR_FROM_RGB = np.array([[65.481, 128.553, 24.966], [-37.797, -74.203, 112.0], [112.0, -93.786, -18.214]])
RGB_FROM_YCBCR = np.linalg.inv(YCBCR_FROM_RGB)
YCBCR_OFFSET = np.array([16.0, 128.0, 128.0])


def rgb2ycbcr(x: jax.Array) -> jax.Array:
    """skimage.color.rgb2ycbcr on (..., 3): x @ M.T + (16, 128, 128), no range check or scaling."""
    return x @ jnp.asarray(YCBCR_FROM_RGB.T, x.dtype) + jnp.asarray(YCBCR_OFFSET, x.dtype)


def ycbcr2rgb(x: jax.Array) -> jax.Array:
    """skimage.color.ycbcr2rgb on (..., 3) (the authors run it in float64; float32 here)."""
    return (x - jnp.asarray(YCBCR_OFFSET, x.dtype)) @ jnp.asarray(RGB_FROM_YCBCR.T, x.dtype)


# prior name -> eps_fn(module, params, x (B, H, W, 3), row) -> eps (B, H, W, 3) float32
def _guided_eps(module, params, x, row):
    t = jnp.full((x.shape[0],), row["t"])
    return module.apply({"params": params}, x, t)[..., : x.shape[-1]]  # learn_sigma: eps first


def _sr3_eps(module, params, x, row):
    g = jnp.full((x.shape[0],), row["g"])
    return module.apply({"params": params}, x, g).astype(jnp.float32)


PRIORS: dict[str, Callable] = {"guided_diffusion": _guided_eps, "sr3": _sr3_eps}


def ddfm_step(eps_fn, params, x, em: EMState, row, I, V, *, lamb: float, rho: float, clip: bool):
    """One DDIM + EM step. -> (x_prev, em, x0). x (B, H, W, 3 or 1) float32; I, V (B, H, W)."""
    eps = eps_fn(params, x, row)
    x0 = row["sqrt_recip"] * x - row["sqrt_recipm1"] * eps
    if clip:
        x0 = jnp.clip(x0, -1.0, 1.0)
    grey = x0.shape[-1] == 1  # a 1-channel prior: the image (x, x, x), whose chroma stays 128
    rgb = jnp.repeat(x0, 3, axis=-1) if grey else x0
    ycc = rgb2ycbcr(rgb) / 255
    y, em = em_onestep(ycc[..., 0], I, V, em, lamb=lamb, rho=rho)
    x0 = ycbcr2rgb(ycc.at[..., 0].set(y) * 255)
    if grey:
        x0 = jnp.mean(x0, axis=-1, keepdims=True)
    eps = (row["sqrt_recip"] * x - x0) / row["sqrt_recipm1"]
    x = x0 * jnp.sqrt(row["acp_prev"]) + jnp.sqrt(1 - row["acp_prev"]) * eps
    return x, em, x0


def fused_luminance(x: np.ndarray) -> np.ndarray:
    """Final sample (..., H, W, 3) -> OpenCV RGB->YCrCb luma, min-max stretched to [0, 1] per image
    (the authors' output, before their x255). A 1-channel sample is its own luma."""
    y = x[..., 0] if x.shape[-1] == 1 else x[..., 0] * LUMA[0] + x[..., 1] * LUMA[1] + x[..., 2] * LUMA[2]
    lo = y.min(axis=(-2, -1), keepdims=True)
    hi = y.max(axis=(-2, -1), keepdims=True)
    return (y - lo) / np.maximum(hi - lo, 1e-12)


@dataclasses.dataclass(frozen=True, eq=False)
class Sampler:
    """A prior + its respaced schedule + the EM settings. Hashable: jitted functions are cached on it.

    module: the prior's Flax module; prior: a `PRIORS` name; tables: `respaced_tables(...)`.
    """

    module: Any
    prior: str
    tables: Tables
    lamb: float = LAMB
    rho: float = RHO
    clip: bool = True  # the config's diffusion.clip_denoised

    def _key(self):
        return (self.module, self.prior, tuple(self.tables.timestep_map), tuple(self.tables.alphas_cumprod),
                self.lamb, self.rho, self.clip)

    def __hash__(self):
        return hash(self._key())

    def __eq__(self, other):
        return isinstance(other, Sampler) and self._key() == other._key()

    @property
    def num_steps(self) -> int:
        return self.tables.num_steps

    def _step_fn(self, params, I, V):
        eps_fn = functools.partial(PRIORS[self.prior], self.module)

        def step(carry, row):
            x, em = carry
            x, em, _ = ddfm_step(eps_fn, params, x, em, row, I, V, lamb=self.lamb, rho=self.rho, clip=self.clip)
            return (x, em), x
        return step

    def init(self, x_start, I) -> tuple[jax.Array, EMState]:
        return jnp.asarray(x_start, jnp.float32), em_initial(jnp.asarray(I, jnp.float32))

    def sample(self, params, x_start, I, V, *, return_steps: bool = False):
        """The whole sampler: x_start (B, H, W, 3) -> x_0 (and, if return_steps, every step's sample
        (N, B, H, W, 3)). Call through `jitted_sample`."""
        step = self._step_fn(params, I, V)
        (x, _), steps = jax.lax.scan(step, self.init(x_start, I), self.tables.rows())
        return (x, steps) if return_steps else x

    def sample_chunk(self, params, carry, I, V, start, length: int):
        """`length` steps from step index `start` (dynamic: one compile serves every chunk)."""
        rows = {k: jax.lax.dynamic_slice_in_dim(v, start, length) for k, v in self.tables.rows().items()}

        def step(c, row):
            c, _ = self._step_fn(params, I, V)(c, row)
            return c, None
        carry, _ = jax.lax.scan(step, carry, rows)
        return carry


@functools.lru_cache(maxsize=32)
def jitted_sample(sampler: Sampler, return_steps: bool = False):
    """jit(sampler.sample): (params, x_start, I, V) -> x_0 [, steps]."""
    return compilation.jit(functools.partial(sampler.sample, return_steps=return_steps))


@functools.lru_cache(maxsize=32)
def jitted_chunk(sampler: Sampler, length: int):
    """jit(sampler.sample_chunk) for chunks of `length` steps: (params, carry, I, V, start) -> carry."""
    return compilation.jit(functools.partial(sampler.sample_chunk, length=length))


def chunk_length(num_steps: int, max_chunk: int = 10) -> int:
    """The largest divisor of num_steps <= max_chunk: equal chunks, one compile."""
    return max(d for d in range(1, min(num_steps, max_chunk) + 1) if num_steps % d == 0)
