"""Runs a DMFuse `jax.export` artefact with jax and numpy only (no dmfuse_jax, no flax).

    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("loader", "BUNDLE/export/dmfuse_export_loader.py")
    loader = importlib.util.module_from_spec(spec); spec.loader.exec_module(loader)
    fuser = loader.load("BUNDLE/export")
    fused = fuser(ir, vis)            # numpy: (H, W[, 1|3]) uint8 or float [0, 1] -> float32 [0, 1]

Colour visible images take the YCbCr route (fuse Y, keep Cb/Cr, BT.601 full range); inputs are
padded (reflect, bottom/right) to the export's bucket multiple and the result is cropped back.
"""
from __future__ import annotations

import json
import os

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


class ExportedFuser:
    def __init__(self, folder):
        with open(os.path.join(folder, "export.json")) as f:
            self.meta = json.load(f)
        with open(os.path.join(folder, "fuse.jaxexport"), "rb") as f:
            self.exported = jax_export.deserialize(bytearray(f.read()))
        dtype = jnp.dtype(self.meta["param_dtype"])
        with np.load(os.path.join(folder, "params.npz")) as z:
            arrays = [z[f"p{i:04d}"] for i in range(self.meta["n_params"])]
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
    return ExportedFuser(folder)
