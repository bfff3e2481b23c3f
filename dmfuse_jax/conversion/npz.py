"""Flat npz parameter files -> Flax param trees (and back).

Format: one array per parameter, the key is the Flax parameter path joined with "/", Flax layout
(HWIO kernels), any float dtype (loaded as float32):

  UNet file   downs_0/res_block/block1/conv/kernel, ...           (the tree under params['unet'])
  head file   conv_in1/conv2d/kernel, ...                          (the tree under params['head'])
  one file    unet/downs_0/...  and  head/conv_in1/...             (the whole {'unet', 'head'} tree)

`../shared/weights/dmfuse_jax_roadscene_*.npz` are such files. Every key is checked against the
config's model: a missing, unexpected or mis-shaped key is a `UserError` naming the file and the key.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from dmfuse_jax.errors import UserError

PARTS = ("unet", "head")
SEP = "/"


def flatten(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dict of arrays -> {"a/b/c": array}."""
    from flax import traverse_util
    return {prefix + SEP.join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(dict(tree)).items()}


def unflatten(flat: Mapping[str, Any]) -> dict:
    from flax import traverse_util
    return traverse_util.unflatten_dict({tuple(k.split(SEP)): v for k, v in flat.items()})


def save_npz(path: str | os.PathLike, tree: Mapping, dtype: str | None = None) -> Path:
    """Writes a param tree as a flat npz (atomically), optionally cast to `dtype`."""
    import tempfile

    path = Path(path)
    flat = flatten(tree)
    if dtype is not None:
        flat = {k: v.astype(dtype) for k, v in flat.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.npz", dir=path.parent)
    os.close(fd)
    try:
        np.savez(tmp, **flat)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A flat npz -> {key: float32 array}; unreadable files are a UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file (npz parameter file)")
    try:
        with np.load(path, allow_pickle=False) as z:
            flat = {k: np.asarray(z[k]) for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"{path}: not a readable npz file: {type(e).__name__}: {str(e)[:200]}") from None
    for k, v in flat.items():
        if not np.issubdtype(v.dtype, np.floating):
            raise UserError(f"{path}: key {k!r} holds {v.dtype} values, expected floating-point params")
    if not flat:
        raise UserError(f"{path}: holds no arrays")
    return {k: v.astype(np.float32) for k, v in flat.items()}


def split_parts(flat: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]] | None:
    """A whole-model file (every key starts with "unet/" or "head/") -> {part: flat}; else None."""
    if not all(k.split(SEP, 1)[0] in PARTS and SEP in k for k in flat):
        return None
    out: dict[str, dict[str, np.ndarray]] = {}
    for k, v in flat.items():
        part, rest = k.split(SEP, 1)
        out.setdefault(part, {})[rest] = v
    return out


def check_flat(flat: Mapping[str, np.ndarray], want: Mapping[str, tuple], source: str, what: str) -> None:
    """One-line UserError naming `source` and the first offending key (with counts of the others)."""
    missing = sorted(set(want) - set(flat))
    unexpected = sorted(set(flat) - set(want))
    misshaped = [k for k in sorted(set(want) & set(flat)) if tuple(flat[k].shape) != tuple(want[k])]
    def more(keys, what):
        return f" (+{len(keys) - 1} more {what})" if len(keys) > 1 else ""

    problems = []
    if missing:
        problems.append(f"missing key {missing[0]!r}" + more(missing, "missing"))
    if unexpected:
        problems.append(f"unexpected key {unexpected[0]!r}" + more(unexpected, "unexpected"))
    if misshaped:
        k = misshaped[0]
        problems.append(f"key {k!r} has shape {tuple(flat[k].shape)}, the config needs {tuple(want[k])}"
                        + more(misshaped, "mis-shaped"))
    if problems:
        raise UserError(f"{source}: does not fit {what}: " + "; ".join(problems))


def _config_desc(config) -> str:
    u = config.model.unet
    return f"the config's model (UNet width {u.inner_channels}, mults {tuple(u.channel_mults)})"


def load_like(path: str | os.PathLike, part: str, template, what: str) -> dict:
    """The `part` ('unet' or 'head') params from a flat npz, checked against `template` (a tree of
    arrays or ShapeDtypeStructs): a file of that part alone, or a whole-model file (its `part/`
    keys). `what` names the template in errors. -> nested float32 numpy tree."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    flat = read_npz(path)
    parts = split_parts(flat)
    if parts is not None:
        if part not in parts:
            raise UserError(f"{path}: a whole-model npz (keys unet/..., head/...) without {part}/ keys")
        flat = parts[part]
    want = {k: tuple(v.shape) for k, v in flatten_shapes(template).items()}
    check_flat(flat, want, str(path), what)
    return unflatten(flat)


def load_part(path: str | os.PathLike, part: str, config) -> dict:
    """The `part` params of `config`'s model from a flat npz (see `load_like`)."""
    from dmfuse_jax.models.params import param_shapes

    return load_like(path, part, param_shapes(config)[part], f"the {part} of {_config_desc(config)}")


def load_model(config, *, unet: str | None = None, head: str | None = None,
               params: str | None = None) -> dict:
    """{'unet', 'head'} float32 params of `config`'s model from npz files: `params` (one file with
    unet/ and head/ keys) or `unet` + `head` (one file each)."""
    from dmfuse_jax.models.params import param_shapes

    if params is not None:
        if unet is not None or head is not None:
            raise UserError("give either one whole-model npz or a UNet npz and a head npz, not both")
        flat = read_npz(params)
        parts = split_parts(flat)
        if parts is None:
            bad = next(k for k in flat if k.split(SEP, 1)[0] not in PARTS or SEP not in k)
            raise UserError(f"{params}: a whole-model npz needs every key under unet/ or head/, found {bad!r}")
        want = {k: tuple(v.shape) for k, v in flatten_shapes(param_shapes(config)).items()}
        check_flat({f"{p}/{k}": v for p, f in parts.items() for k, v in f.items()}, want, str(params),
                   _config_desc(config))
        return {p: unflatten(parts[p]) for p in PARTS}
    if unet is None or head is None:
        raise UserError("give a UNet npz and a head npz (or one whole-model npz with unet/ and head/ keys)")
    return {"unet": load_part(unet, "unet", config), "head": load_part(head, "head", config)}


def flatten_shapes(tree) -> dict[str, Any]:
    from flax import traverse_util
    return {SEP.join(k): v for k, v in traverse_util.flatten_dict(dict(tree)).items()}
