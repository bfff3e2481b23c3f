"""Gaussian diffusion with a continuous noise level (SR3 / WaveGrad style), in one small module.

The UNet is conditioned on g = sqrt(alpha_bar), a scalar per image, not on an integer step.
Step t (1-based) owns the interval [sqrt_alphas_cumprod_prev[t], sqrt_alphas_cumprod_prev[t-1]];
training and feature extraction draw g uniformly from it, and x_t = g x0 + sqrt(1 - g^2) eps.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Precomputed schedule arrays (numpy float64, host constants folded into jitted code)."""

    betas: np.ndarray  # (T,)
    alphas_cumprod: np.ndarray  # (T,)
    sqrt_alphas_cumprod_prev: np.ndarray  # (T + 1,), entry 0 is 1.0

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])


def make_beta_schedule(kind: str, n_timestep: int, *, cosine_s: float = 8e-3,
                       linear_start: float = 1e-4, linear_end: float = 2e-2) -> np.ndarray:
    """Betas of the SR3 code base: `cosine` (Nichol and Dhariwal 2021, clipped at 0.999) or `linear`."""
    if kind == "cosine":
        steps = np.arange(n_timestep + 1, dtype=np.float64) / n_timestep + cosine_s
        alphas = np.cos(steps / (1 + cosine_s) * math.pi / 2) ** 2
        alphas = alphas / alphas[0]
        betas = 1 - alphas[1:] / alphas[:-1]
        return np.clip(betas, None, 0.999)
    if kind == "linear":
        return np.linspace(linear_start, linear_end, n_timestep, dtype=np.float64)
    raise ValueError(f"unknown beta schedule {kind!r} (expected 'cosine' or 'linear')")


def make_schedule(kind: str = "cosine", n_timestep: int = 2000, **kwargs) -> Schedule:
    betas = make_beta_schedule(kind, n_timestep, **kwargs)
    alphas_cumprod = np.cumprod(1.0 - betas)
    return Schedule(
        betas=betas,
        alphas_cumprod=alphas_cumprod,
        sqrt_alphas_cumprod_prev=np.sqrt(np.append(1.0, alphas_cumprod)),
    )


def sample_noise_level(key: jax.Array, schedule: Schedule, t: jax.Array) -> jax.Array:
    """g ~ U[sqrt_acp_prev[t], sqrt_acp_prev[t-1]] per entry of the integer array t (1-based)."""
    table = jnp.asarray(schedule.sqrt_alphas_cumprod_prev, jnp.float32)
    lo, hi = table[t], table[t - 1]
    u = jax.random.uniform(key, jnp.shape(t), jnp.float32)
    return lo + (hi - lo) * u


def q_sample(x0: jax.Array, g: jax.Array, eps: jax.Array) -> jax.Array:
    """x_t = g x0 + sqrt(1 - g^2) eps. x0, eps: (..., H, W, C); g: (...,), the leading axes of x0
    ((B,) for a UNet batch)."""
    g = g.astype(x0.dtype)[..., None, None, None]
    return g * x0 + jnp.sqrt(1.0 - g * g) * eps


def ddpm_loss(denoise_fn: Callable[[jax.Array, jax.Array], jax.Array], x0: jax.Array, key: jax.Array,
              schedule: Schedule, loss_type: str = "l2") -> tuple[jax.Array, dict]:
    """The DDPM epsilon loss with a continuous noise level.

    denoise_fn(x_t (B, H, W, C), g (B,)) -> eps_hat (B, H, W, C). Returns (scalar loss, aux metrics).
    """
    b = x0.shape[0]
    k_t, k_g, k_eps = jax.random.split(key, 3)
    t = jax.random.randint(k_t, (b,), 1, schedule.num_timesteps + 1)
    g = sample_noise_level(k_g, schedule, t)
    eps = jax.random.normal(k_eps, x0.shape, jnp.float32).astype(x0.dtype)
    eps_hat = denoise_fn(q_sample(x0, g, eps), g).astype(jnp.float32)
    diff = eps_hat - eps.astype(jnp.float32)
    if loss_type == "l2":
        loss = jnp.mean(diff * diff)
    elif loss_type == "l1":
        loss = jnp.mean(jnp.abs(diff))
    else:
        raise ValueError(f"unknown diffusion loss {loss_type!r} (expected 'l1' or 'l2')")
    return loss, {"noise_level_mean": jnp.mean(g)}


def p_sample_loop(denoise_fn: Callable[[jax.Array, jax.Array], jax.Array], key: jax.Array,
                  shape: tuple[int, ...], schedule: Schedule, num_steps: int | None = None) -> jax.Array:
    """Ancestral DDPM sampling from pure noise, as SR3's p_sample_loop (x0 clipped to [-1, 1]).

    num_steps respaces the chain to fewer steps (evenly strided), which keeps preview grids cheap.
    Returns x0 samples (shape), in [-1, 1]. Runs as one lax.scan: jit the caller, not the loop.
    """
    T = schedule.num_timesteps
    n = T if num_steps is None else int(num_steps)
    use = np.unique(np.linspace(0, T - 1, n).round().astype(np.int64))
    acp = schedule.alphas_cumprod[use]
    acp_prev = np.append(1.0, acp[:-1])
    betas = 1.0 - acp / acp_prev
    c = dict(
        sqrt_recip=np.sqrt(1.0 / acp), sqrt_recipm1=np.sqrt(1.0 / acp - 1),
        coef1=betas * np.sqrt(acp_prev) / (1.0 - acp),
        coef2=(1.0 - acp_prev) * np.sqrt(1.0 - betas) / (1.0 - acp),
        logvar=np.log(np.maximum(betas * (1.0 - acp_prev) / (1.0 - acp), 1e-20)),
        g=np.sqrt(acp),
    )
    c = {k: jnp.asarray(v[::-1], jnp.float32) for k, v in c.items()}  # from the noisiest step down
    last = jnp.arange(len(use))[::-1] == 0

    def step(x, inputs):
        ci, is_last, k = inputs
        g = jnp.full((shape[0],), ci["g"])
        eps_hat = denoise_fn(x, g).astype(jnp.float32)
        x0 = jnp.clip(ci["sqrt_recip"] * x - ci["sqrt_recipm1"] * eps_hat, -1.0, 1.0)
        mean = ci["coef1"] * x0 + ci["coef2"] * x
        noise = jax.random.normal(k, shape, jnp.float32)
        x = mean + jnp.where(is_last, 0.0, jnp.exp(0.5 * ci["logvar"])) * noise
        return x, None

    k0, key = jax.random.split(key)
    keys = jax.random.split(key, len(use))
    x, _ = jax.lax.scan(step, jax.random.normal(k0, shape, jnp.float32), (c, last, keys))
    return jnp.clip(x, -1.0, 1.0)
