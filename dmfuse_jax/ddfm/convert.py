"""guided-diffusion PyTorch state_dict -> (GuidedUNet, Flax params).

Renaming: the indices of a PyTorch key join the name before them with '_'
(`input_blocks.3.1.qkv.weight` -> `input_blocks_3_1/qkv/kernel`). Layouts: conv OIHW -> HWIO, the
1x1 conv1d of attention (O, I, 1) and linear (O, I) -> Dense (I, O), GroupNorm weight -> scale.
Every key that does not fit is reported at once (missing, unexpected, mis-shaped).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from dmfuse_jax.errors import UserError


def _numpy(v) -> np.ndarray:
    if hasattr(v, "detach"):
        v = v.detach().cpu().float().numpy()
    return np.asarray(v, np.float32)


def flax_path(torch_key: str) -> tuple[str, ...]:
    """'input_blocks.1.0.in_layers.2.weight' -> ('input_blocks_1_0', 'in_layers_2', 'weight')."""
    out: list[str] = []
    for part in torch_key.split("."):
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


def _to_flax(leaf_kinds: set[str], name: str, v: np.ndarray) -> tuple[str, np.ndarray]:
    if name == "bias":
        return "bias", v
    if name != "weight":
        return name, v
    if "scale" in leaf_kinds:  # GroupNorm
        return "scale", v
    if v.ndim == 4:
        return "kernel", v.transpose(2, 3, 1, 0)
    if v.ndim == 3:  # conv_nd(1, ...) with kernel 1 (attention) -> Dense
        return "kernel", v[..., 0].T
    return "kernel", v.T


def convert_params(state_dict: Mapping[str, Any], module, *, source: str = "state_dict") -> dict:
    """state_dict -> params fitting `module` (a GuidedUNet), or UserError listing every misfit."""
    import jax
    import jax.numpy as jnp
    from flax.traverse_util import flatten_dict, unflatten_dict

    n = 2 * module.total_stride
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, n, n, module.in_channels)),
                            jnp.zeros((1,)))["params"]
    want = {k: tuple(v.shape) for k, v in flatten_dict(shapes).items()}
    kinds: dict[tuple[str, ...], set[str]] = {}
    for k in want:
        kinds.setdefault(k[:-1], set()).add(k[-1])

    got: dict[tuple[str, ...], np.ndarray] = {}
    unexpected, misshaped = [], []
    for key, value in state_dict.items():
        path = flax_path(key)
        mod = path[:-1]
        if mod not in kinds:
            unexpected.append(key)
            continue
        leaf, arr = _to_flax(kinds[mod], path[-1], _numpy(value))
        if mod + (leaf,) not in want:
            unexpected.append(key)
        elif arr.shape != want[mod + (leaf,)]:
            misshaped.append((key, f"{tuple(np.shape(value))} (does not give {want[mod + (leaf,)]})"))
        else:
            got[mod + (leaf,)] = arr
    bad_shape = {key for key, _ in misshaped}
    missing = [t for t in (_torch_name(k) for k in want if k not in got) if t not in bad_shape]
    if unexpected or misshaped or missing:
        lines = [f"{what} ({len(keys)}): {', '.join(keys[:20])}{' ...' if len(keys) > 20 else ''}"
                 for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("mis-shaped keys", [f"{k} {s}" for k, s in misshaped])) if keys]
        raise UserError(f"{source}: does not fit the guided-diffusion config: " + " | ".join(lines))
    return unflatten_dict(got)


def state_dict_shapes(module) -> dict[str, tuple[int, ...]]:
    """The PyTorch state_dict {key: shape} that `module` (a GuidedUNet) converts from (by shape
    evaluation only: nothing is allocated, so it serves the 552.8 M-param OpenAI config too)."""
    import jax
    import jax.numpy as jnp
    from flax.traverse_util import flatten_dict

    n = 2 * module.total_stride
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, n, n, module.in_channels)),
                            jnp.zeros((1,)))["params"]
    out = {}
    for k, v in flatten_dict(shapes).items():
        shape = tuple(v.shape)
        if k[-1] == "kernel":
            is_conv = len(shape) == 4
            shape = (shape[3], shape[2], shape[0], shape[1]) if is_conv else (shape[1], shape[0])
            if not is_conv and k[-2] in ("qkv", "proj_out"):
                shape = shape + (1,)  # attention's conv_nd(1, ...)
        out[_torch_name(k)] = shape
    return out


def _torch_name(flax_key: tuple[str, ...]) -> str:
    """('input_blocks_1_0', 'in_layers_0', 'scale') -> 'input_blocks.1.0.in_layers.0.weight'."""
    leaf = {"kernel": "weight", "scale": "weight"}.get(flax_key[-1], flax_key[-1])
    return ".".join([re.sub(r"_(\d+)", r".\1", p) for p in flax_key[:-1]] + [leaf])


def convert_guided_diffusion(state_dict: Mapping[str, Any], create_model_kwargs: Mapping[str, Any],
                             *, dtype: str = "float32", source: str = "state_dict"):
    """guided-diffusion state_dict + its create_model(...) arguments -> (GuidedUNet, params)."""
    from dmfuse_jax.ddfm.config import build_guided_unet

    try:
        module = build_guided_unet(dict(create_model_kwargs), dtype)
    except ValueError as e:
        raise UserError(f"{source}: {e}") from None
    return module, convert_params(state_dict, module, source=source)
