"""Host-side parameter initialisation: Flax's default distributions without compiling `init`.

Compiling a model's `init` costs as much as compiling its forward pass (tens of seconds for the
UNet on a 2-core CPU). Here the parameter shapes come from `jax.eval_shape` (tracing only) and
the values are drawn in numpy: kernels lecun-normal (truncated normal, std sqrt(1 / fan_in)), biases
and norm offsets 0, norm scales 1, CAIM's gamma 0 — the same distributions as Flax's defaults.
Used by `inference.fuser.random_params` (random models for tests, demos and benchmarks). Training
initialises with `model.init` inside its jit; this stream differs from `model.init`'s.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from flax import traverse_util

# Flax's lecun_normal uses a truncated normal on [-2, 2] rescaled to unit variance.
_TRUNC_STD = 0.87962566103423978


def _leaf_value(path: tuple[str, ...], shape: tuple[int, ...], dtype, rng: np.random.Generator) -> np.ndarray:
    name = path[-1]
    if name == "kernel":
        fan_in = int(np.prod(shape[:-1]))
        x = rng.standard_normal(shape)
        while np.any(np.abs(x) > 2):  # resample the tails: truncated normal on [-2, 2]
            bad = np.abs(x) > 2
            x[bad] = rng.standard_normal(int(bad.sum()))
        return (x * (np.sqrt(1.0 / fan_in) / _TRUNC_STD)).astype(dtype)
    if name == "scale":
        return np.ones(shape, dtype)
    if name in ("bias", "gamma"):
        return np.zeros(shape, dtype)
    raise ValueError(f"no host-side initialiser for parameter {'/'.join(path)}")


def params_from_shapes(shapes: Any, seed: int) -> Any:
    """A tree of ShapeDtypeStructs (e.g. from `jax.eval_shape`) -> numpy params, deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(shapes)
    values = {path: _leaf_value(path, tuple(s.shape), s.dtype, rng) for path, s in sorted(flat.items())}
    return traverse_util.unflatten_dict(values)
