"""Respaced schedules (guided-diffusion's `respace.py` and `get_named_beta_schedule`): keep a subset of
a schedule's timesteps and re-derive the betas from them, for DDIM sampling in fewer steps (DDFM,
`ddfm/sampler.py`). Beside `gaussian.py`, DMFuse's own schedule, so the diffusion maths are one place.
float64 numpy, as the authors compute them.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


def space_timesteps(num_timesteps: int, section_counts) -> set[int]:
    """guided-diffusion's respacing: `section_counts` steps from equal portions ('100', [10, 15], 'ddim50')."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for i in range(1, num_timesteps):
                if len(range(0, num_timesteps, i)) == desired:
                    return set(range(0, num_timesteps, i))
            raise ValueError(f"cannot create exactly {num_timesteps} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    elif isinstance(section_counts, int):
        section_counts = [section_counts]
    size_per = num_timesteps // len(section_counts)
    extra = num_timesteps % len(section_counts)
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return set(steps)


def named_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
    """guided-diffusion's get_named_beta_schedule ('linear' scaled to 1000 steps, or 'cosine')."""
    if name == "linear":
        scale = 1000 / num_timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    if name == "cosine":
        f = lambda t: np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
        i = np.arange(num_timesteps, dtype=np.float64)
        return np.minimum(1 - f((i + 1) / num_timesteps) / f(i / num_timesteps), 0.999)
    raise ValueError(f"unknown beta schedule {name!r} (expected 'linear' or 'cosine')")


@dataclasses.dataclass(frozen=True)
class Tables:
    """Respaced DDIM constants, in sampling order (noisiest step first). float64 numpy."""

    timestep_map: np.ndarray  # (N,) original timesteps, ascending
    alphas_cumprod: np.ndarray  # (N,) respaced, ascending in t

    @property
    def num_steps(self) -> int:
        return len(self.timestep_map)

    def rows(self) -> dict[str, jax.Array]:
        """(N,) float32 columns per step, noisiest first, cast as the authors cast (float64 -> float32)."""
        acp = self.alphas_cumprod
        acp_prev = np.append(1.0, acp[:-1])
        cols = dict(
            t=self.timestep_map.astype(np.float32),
            g=np.sqrt(acp),  # the SR3 prior's continuous noise level
            sqrt_recip=np.sqrt(1.0 / acp), sqrt_recipm1=np.sqrt(1.0 / acp - 1),
            acp_prev=acp_prev,
        )
        return {k: jnp.asarray(v[::-1].astype(np.float32)) for k, v in cols.items()}


def respaced_tables(base_betas: np.ndarray, respacing) -> Tables:
    """SpacedDiffusion: keep the timesteps of `space_timesteps` and re-derive the betas from them."""
    base_acp = np.cumprod(1.0 - np.asarray(base_betas, np.float64))
    use = space_timesteps(len(base_acp), respacing)
    last, betas, tmap = 1.0, [], []
    for i, a in enumerate(base_acp):
        if i in use:
            betas.append(1 - a / last)
            last = a
            tmap.append(i)
    return Tables(np.asarray(tmap, np.int64), np.cumprod(1.0 - np.asarray(betas)))
