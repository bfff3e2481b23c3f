"""The `jax.export` artefact: the whole fuse function as serialized StableHLO, runnable without the
model code (`standalone_loader.py`, copied beside it, imports only jax and numpy).

  BUNDLE/export/fuse.jaxexport        `jax.export.Exported.serialize()` of
                                      f(params: list, ir, vi, seed) -> fused
  BUNDLE/export/params.npz            the params as a flat list (p0000, p0001, ...; 2-byte floats
                                      stored as uint16 bits, see export.json)
  BUNDLE/export/export.json           shapes, dtypes, bucket multiple, input range, platforms, and
                                      the sha256 of the artefact and of every params.npz array
  BUNDLE/export/dmfuse_export_loader.py   the loader (a copy of `standalone_loader.py`)

ir, vi: (B, H, W, 1) float32 in [0, 1] with SYMBOLIC B, H and W: H and W any multiples of the
UNet stride (16) of at least two strides (the deepest level needs >= 2 rows for its reflection
padding); seed: int32 scalar. The loader pads inputs to the bucket multiple (as `dmfuse fuse`) and
crops, so artefact and live model agree. Lowered for CPU and CUDA; attention uses the portable XLA
paths (no Pallas kernels) so one artefact runs on both. The loader checks every sha256 before it
runs anything: a damaged file is one error naming the file and the array (`ExportError`).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dmfuse_jax import compilation

EXPORT_DIR = "export"
ARTEFACT = "fuse.jaxexport"
PARAMS = "params.npz"
META = "export.json"
LOADER = "dmfuse_export_loader.py"
PLATFORMS = ("cpu", "cuda")


def export_fuse(config, params, *, dtype: str | None = None, platforms: Sequence[str] = PLATFORMS):
    """-> (jax.export.Exported, flat param list in the artefact's dtype, meta dict)."""
    import jax
    import jax.numpy as jnp
    from jax import export as jax_export

    from dmfuse_jax.models.builders import portable_config
    from dmfuse_jax.inference.fuser import fuse_function
    from dmfuse_jax.models.params import cached_model, config_key

    config = portable_config(config)
    dtype = dtype or config.model.get("dtype", "float32")
    model, cfg = cached_model(config_key(config, dtype))
    store = jnp.dtype(dtype)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    flat = [np.asarray(x).astype(store) for x in leaves]
    fuse = fuse_function(model, cfg.model.input_range)

    def f(flat_params, ir, vi, seed):
        p = jax.tree_util.tree_unflatten(treedef, [x.astype(jnp.float32) for x in flat_params])
        return fuse(p, ir, vi, seed)

    stride = model.unet.total_stride
    spec = f"b, {stride}*h, {stride}*w, 1"
    shape = jax_export.symbolic_shape(spec, constraints=("h >= 2", "w >= 2"))
    img = jax.ShapeDtypeStruct(shape, jnp.float32)
    exported = jax_export.export(jax.jit(f), platforms=tuple(platforms))(
        [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in flat], img, img, jax.ShapeDtypeStruct((), jnp.int32))
    meta = {
        "format": "dmfuse-jax-export", "version": 1,
        "signature": "f(params: list, ir (B, H, W, 1) float32 [0,1], vi (B, H, W, 1) float32 [0,1], "
                     "seed int32 ()) -> fused (B, H, W, 1) float32 [0,1]",
        "input_shape": spec, "constraints": ["h >= 2", "w >= 2"], "stride": stride,
        "min_size": 2 * stride, "compute_dtype": dtype, "param_dtype": dtype,
        "input_range": cfg.model.input_range, "platforms": list(platforms),
        "jax_version": jax.__version__, "n_params": len(flat),
        "calling_convention_version": exported.calling_convention_version,
        # per platform, the XLA options the loader compiles with (see dmfuse_jax/compilation.py)
        "compiler_options": {p: dict(o) for p, o in compilation.BACKEND_OPTIONS.items() if p in platforms},
    }
    return exported, flat, meta


def write_export(folder: str | Path, config, params, *, dtype: str | None = None, bucket: int = 64,
                 seed: int = 0, platforms: Sequence[str] = PLATFORMS) -> Path:
    """Writes the artefact files into `folder/export/` (inside a bundle being written)."""
    exported, flat, meta = export_fuse(config, params, dtype=dtype, platforms=platforms)
    if bucket % meta["stride"] or bucket < meta["min_size"]:
        raise ValueError(f"bucket multiple {bucket} must be a multiple of {meta['stride']} and >= {meta['min_size']}")
    meta.update(bucket_multiple=bucket, default_seed=seed)
    out = Path(folder) / EXPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    artefact = exported.serialize()
    (out / ARTEFACT).write_bytes(artefact)
    arrays: dict[str, Any] = {}
    for i, x in enumerate(flat):
        arrays[f"p{i:04d}"] = x.view(np.uint16) if x.dtype.itemsize == 2 and x.dtype != np.float16 else x
    np.savez(out / PARAMS, **arrays)
    # The loader's checks: sha256 of the artefact's bytes and of each stored array's bytes (C order).
    meta.update(checksum="sha256", artefact_sha256=hashlib.sha256(artefact).hexdigest(),
                params_sha256={k: hashlib.sha256(np.ascontiguousarray(a).reshape(-1).view(np.uint8)).hexdigest()
                               for k, a in arrays.items()})
    (out / META).write_text(json.dumps(meta, indent=2) + "\n")
    shutil.copyfile(Path(__file__).with_name("standalone_loader.py"), out / LOADER)
    return out
