"""Map PyTorch state_dicts onto Flax param trees.

Layouts: conv OIHW -> HWIO, linear (out, in) -> (in, out), GroupNorm weight -> scale.
Every mismatch is collected and reported at once (missing, unexpected, mis-shaped keys).
Works on plain numpy arrays, so torch is only needed to read `.pth` files.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

# Present in the released head but unused by its forward pass: reported, not an error.
KNOWN_UNUSED_HEAD_KEYS = tuple(
    f"{m}.conv2d.{p}" for m in ("conv_in2", "conv_in3", "conv_in4", "conv_in5", "conv_t2", "conv_t3")
    for p in ("weight", "bias"))


class ConversionError(ValueError):
    """The state_dict does not fit the Flax model; the message lists every problem."""


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reads a PyTorch `.pth` state_dict (CUDA-saved ones too) into float32 numpy arrays."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading .pth files needs PyTorch: pip install 'dmfuse-jax[torch]' "
                          "(on CPU-only machines install torch==2.13.0 first)") from e
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path}: expected a state_dict (a mapping of names to tensors), "
                              f"got {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        k = k.removeprefix("module.")  # DataParallel prefix
        out[k] = v.detach().cpu().float().numpy() if hasattr(v, "detach") else np.asarray(v, np.float32)
    return out


def _to_flax_layout(torch_name: str, value: np.ndarray, flax_leaf: str) -> np.ndarray:
    if value.ndim == 4:  # conv OIHW -> HWIO
        return np.transpose(value, (2, 3, 1, 0))
    if value.ndim == 2 and flax_leaf == "kernel":  # linear (out, in) -> (in, out)
        return value.T
    return value


def _assign(torch_sd: Mapping[str, np.ndarray], template: Mapping, rename, *, what: str,
            ignore: tuple[str, ...] = ()) -> tuple[dict, list[str]]:
    """Fill `template` (a Flax params tree) from `torch_sd` via `rename(torch_key) -> flax path`."""
    flat = traverse_util.flatten_dict(template, sep="/")
    out: dict[str, np.ndarray] = {}
    unexpected, misshaped, ignored = [], [], []
    for key, value in torch_sd.items():
        if key in ignore:
            ignored.append(key)
            continue
        path = rename(key)
        if path is None or path not in flat:
            unexpected.append(key)
            continue
        arr = _to_flax_layout(key, np.asarray(value, np.float32), path.rsplit("/", 1)[-1])
        if arr.shape != tuple(flat[path].shape):
            misshaped.append(f"{key}: torch {tuple(value.shape)} -> flax {path} expects "
                             f"{tuple(flat[path].shape)} (got {arr.shape} after layout change)")
            continue
        out[path] = arr
    missing = sorted(set(flat) - set(out))
    if missing or unexpected or misshaped:
        lines = [f"{what}: the state_dict does not fit the model config"]
        if missing:
            lines.append(f"  missing ({len(missing)}): " + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): " + ", ".join(unexpected[:20]) + (" ..." if len(unexpected) > 20 else ""))
        if misshaped:
            lines.append(f"  mis-shaped ({len(misshaped)}):\n    " + "\n    ".join(misshaped[:20]))
        raise ConversionError("\n".join(lines))
    return traverse_util.unflatten_dict(out, sep="/"), ignored


_UNET_RULES = [
    (re.compile(r"^(downs|ups|mid)\.(\d+)\."), r"\1_\2/"),
    (re.compile(r"^noise_level_mlp\.(\d+)\."), r"noise_level_mlp_\1/"),
    (re.compile(r"\.noise_func\.noise_func\.0\."), "/noise_func/"),
    (re.compile(r"\.block\.0\."), "/norm/"),
    (re.compile(r"\.block\.3\."), "/conv/"),
    (re.compile(r"[./]weight$"), "/kernel"),
    (re.compile(r"[./]bias$"), "/bias"),
    (re.compile(r"\."), "/"),
    (re.compile(r"/+"), "/"),
]


def _unet_path(key: str, flat_template: Mapping) -> str:
    path = key
    for pat, rep in _UNET_RULES:
        path = pat.sub(rep, path)
    if path.endswith("/kernel") and path not in flat_template and path[:-6] + "scale" in flat_template:
        path = path[:-6] + "scale"  # GroupNorm weight
    return path


def convert_unet(torch_sd: Mapping[str, np.ndarray], template: Mapping) -> dict:
    """SR3 UNet state_dict -> Flax params matching `template` (e.g. `unet.init(...)['params']`)."""
    flat = traverse_util.flatten_dict(template, sep="/")
    params, _ = _assign(torch_sd, template, lambda k: _unet_path(k, flat), what="SR3 UNet")
    return params


_HEAD_RULES = [
    (re.compile(r"^(en\d)\.conv1\.conv2d\."), r"\1/conv1/conv2d/"),
    (re.compile(r"^(en\d)\.ChannelSpatialSELayer\.cSE\.(fc\d)\."), r"\1/scSE/cSE_\2/"),
    (re.compile(r"^(en\d)\.ChannelSpatialSELayer\.sSE\.conv\."), r"\1/scSE/sSE_conv/"),
    (re.compile(r"^crossatten\.gamma$"), "crossatten/gamma"),
    (re.compile(r"^crossatten\.(\w+_conv)\."), r"crossatten/\1/"),
    (re.compile(r"^conv_in1\.conv2d\."), "conv_in1/conv2d/"),
    (re.compile(r"^conv_t4\.conv2d\."), "conv_t4/conv2d/"),
    (re.compile(r"^conv_t1\.conv1\.conv2d\."), "conv_t1/"),
    (re.compile(r"/weight$"), "/kernel"),
]


def _head_path(key: str) -> str | None:
    path = key
    matched = False
    for pat, rep in _HEAD_RULES[:-1]:
        path, n = pat.subn(rep, path)
        matched |= n > 0
    if not matched:
        return None
    return _HEAD_RULES[-1][0].sub(_HEAD_RULES[-1][1], path)


def convert_fusion_head(torch_sd: Mapping[str, np.ndarray], template: Mapping,
                        *, report: list[str] | None = None) -> dict:
    """Released DMFuse head state_dict -> Flax params of `FusionHead`.

    The known unused keys (conv_in2..5, conv_t2, conv_t3) are skipped and appended to `report`.
    """
    params, ignored = _assign(torch_sd, template, _head_path, what="DMFuse fusion head",
                              ignore=KNOWN_UNUSED_HEAD_KEYS)
    if report is not None:
        report.extend(ignored)
    return params


def params_to_numpy(tree: Any) -> Any:
    import jax
    return jax.tree_util.tree_map(np.asarray, tree)
