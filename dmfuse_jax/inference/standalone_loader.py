"""Runs a DMFuse `jax.export` artefact with jax and numpy only (no dmfuse_jax, no flax).

    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("loader", "BUNDLE/export/dmfuse_export_loader.py")
    loader = importlib.util.module_from_spec(spec); spec.loader.exec_module(loader)
    fuser = loader.load("BUNDLE/export")
    fused = fuser(ir, vis)            # numpy: (H, W[, 1|3]) uint8 or float [0, 1] -> float32 [0, 1]

Colour visible images take the YCbCr route (fuse Y, keep Cb/Cr, BT.601 full range); inputs are
padded (reflect, bottom/right) to the export's bucket multiple and the result is cropped back.

Loading checks the sha256 of the artefact and of every params.npz array (recorded in export.json)
before anything runs: a missing, damaged or unreadable file raises `ExportError`, one line naming the
file and the array. `python dmfuse_export_loader.py BUNDLE/export` only verifies: exit 0, or the
error as one line and exit 2.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import export as jax_export


def _rgb_to_ycbcr(rgb):
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    return np.stack([y, (b - y) * 0.564 + 0.5, (r - y) * 0.713 + 0.5], axis=-1)


def _ycbcr_to_rgb(ycc):
    y, cb, cr = ycc[..., 0], ycc[..., 1] - 0.5, ycc[..., 2] - 0.5
    rgb = np.stack([y + 1.403 * cr, y - 0.714 * cr - 0.344 * cb, y + 1.773 * cb], axis=-1)
    return np.clip(rgb, 0.0, 1.0)


def _to01(x, name):
    x = np.asarray(x)
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3 or x.shape[-1] not in (1, 3):
        raise ValueError(f"{name}: expected (H, W), (H, W, 1) or (H, W, 3), got {x.shape}")
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    x = x.astype(np.float32)
    if x.min() < 0.0 or x.max() > 1.0:
        raise ValueError(f"{name}: float values must lie in [0, 1]")
    if x.shape[-1] == 3 and np.array_equal(x[..., 0], x[..., 1]) and np.array_equal(x[..., 0], x[..., 2]):
        x = x[..., :1]  # RGB-stored grey
    return x


class ExportError(Exception):
    """A missing, damaged or unreadable export file; the message names the file (and the array)."""


def _sha256(a):
    return hashlib.sha256(np.ascontiguousarray(a).reshape(-1).view(np.uint8)).hexdigest()


def _read_meta(folder):
    path = os.path.join(folder, "export.json")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: unreadable export metadata ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict) or meta.get("checksum") != "sha256" or "params_sha256" not in meta:
        raise ExportError(f"{path}: no sha256 checksums (an export written before they existed): export it "
                          "again with dmfuse export")
    return meta


def _read_artefact(folder, meta):
    path = os.path.join(folder, "fuse.jaxexport")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ExportError(f"{path}: unreadable ({e.strerror or e})") from None
    if hashlib.sha256(data).hexdigest() != meta.get("artefact_sha256"):
        raise ExportError(f"{path}: fails its sha256 check (the file is damaged): export it again")
    try:
        return jax_export.deserialize(bytearray(data))
    except Exception as e:  # noqa: BLE001 - any failure here means an artefact this jax cannot read
        raise ExportError(f"{path}: cannot deserialize ({type(e).__name__}: {str(e)[:200]})") from None


def _read_params(folder, meta):
    """The flat param list, each array checked against its sha256 before use."""
    import zipfile

    path = os.path.join(folder, "params.npz")
    expected = meta["params_sha256"]
    arrays = []
    try:
        z = np.load(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ExportError(f"{path}: unreadable ({type(e).__name__}: {e}): the file is damaged; export it again") from None
    with z:
        for i in range(int(meta["n_params"])):
            name = f"p{i:04d}"
            try:
                a = z[name]
            except KeyError:
                raise ExportError(f"{path}: array {name} is missing: export it again") from None
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
                raise ExportError(f"{path}: array {name} is damaged ({type(e).__name__}: {e}): export it again") from None
            if _sha256(a) != expected.get(name):
                raise ExportError(f"{path}: array {name} fails its sha256 check (the file is damaged): export it again")
            arrays.append(a)
    return arrays


class ExportedFuser:
    def __init__(self, folder):
        folder = os.fspath(folder)
        self.meta = _read_meta(folder)
        self.exported = _read_artefact(folder, self.meta)
        dtype = jnp.dtype(self.meta["param_dtype"])
        arrays = _read_params(folder, self.meta)
        self.params = [jnp.asarray(a.view(dtype) if a.dtype == np.uint16 else a) for a in arrays]
        self.multiple = int(self.meta["bucket_multiple"])
        self._call = jax.jit(self.exported.call, compiler_options=self._compiler_options())

    def _compiler_options(self):
        """The export's XLA options for this backend, if this jaxlib knows them (else XLA's defaults)."""
        options = self.meta.get("compiler_options", {}).get(jax.default_backend())
        if not options or os.environ.get("DMFUSE_XLA_CPU_DEFAULTS", "").strip() not in ("", "0"):
            return None
        try:
            jax.jit(lambda x: x + 1, compiler_options=options).lower(jnp.float32(0)).compile()
        except Exception:
            return None
        return options

    def fuse_luma(self, ir, vi, seed=None):
        """ir, vi: (B, H, W, 1) float32 in [0, 1] -> (B, H, W, 1)."""
        b, h, w, _ = ir.shape
        hb, wb = (max(self.multiple, -(-n // self.multiple) * self.multiple) for n in (h, w))
        pad = ((0, 0), (0, hb - h), (0, wb - w), (0, 0))
        ir = np.pad(np.asarray(ir, np.float32), pad, mode="reflect")
        vi = np.pad(np.asarray(vi, np.float32), pad, mode="reflect")
        seed = self.meta["default_seed"] if seed is None else seed
        out = self._call(self.params, ir, vi, np.int32(seed))
        return np.asarray(out)[:, :h, :w]

    def __call__(self, ir, vis, seed=None):
        """One pair -> float32 [0, 1]: (H, W) grey, or (H, W, 3) when `vis` is colour."""
        ir, vis = _to01(ir, "ir"), _to01(vis, "vis")
        if ir.shape[:2] != vis.shape[:2]:
            raise ValueError(f"ir {ir.shape[:2]} and vis {vis.shape[:2]} differ in size")
        if ir.shape[-1] == 3:
            ir = _rgb_to_ycbcr(ir)[..., :1]
        ycc = _rgb_to_ycbcr(vis) if vis.shape[-1] == 3 else None
        vi_y = ycc[..., :1] if ycc is not None else vis
        y = self.fuse_luma(ir[None], vi_y[None].astype(np.float32), seed)[0]
        if ycc is None:
            return y[..., 0]
        return _ycbcr_to_rgb(np.concatenate([y, ycc[..., 1:]], axis=-1)).astype(np.float32)


def load(folder):
    """The export in `folder` (BUNDLE/export), verified; ExportError names a damaged file."""
    return ExportedFuser(folder)


def main(argv=None):
    """`python dmfuse_export_loader.py EXPORT_FOLDER`: verifies the export (exit 0) or prints one line
    naming the damaged file and array (exit 2)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python dmfuse_export_loader.py EXPORT_FOLDER (verifies the export)", file=sys.stderr)
        return 2
    try:
        meta = _read_meta(argv[0])
        _read_artefact(argv[0], meta)
        n = len(_read_params(argv[0], meta))
    except ExportError as e:
        print(f"dmfuse_export_loader: error: {e}", file=sys.stderr)
        return 2
    print(f"{argv[0]}: the artefact and {n} param arrays match their sha256")
    return 0


if __name__ == "__main__":
    sys.exit(main())
