"""Classical fusion baselines (no model, no checkpoint) to put beside DMFuse in tables.

Registry `BASELINES: name -> fn(ir, vis) -> fused`, each on grey float32 arrays in [0, 1] of shape
(H, W) (equal shapes), returning float32 (H, W) in [0, 1]. Pure numpy/scipy. Colour visible images
are handled by the caller (fuse the Y channel, keep the visible image's Cb and Cr).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from scipy import ndimage

Baseline = Callable[[np.ndarray, np.ndarray], np.ndarray]

# Burt-Adelson generating kernel with a = 0.4: [1/4 - a/2, 1/4, a, 1/4, 1/4 - a/2] = [1, 4, 6, 4, 1] / 16.
_BURT_KERNEL = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0
DEFAULT_LEVELS = 4  # detail levels; the pyramid has DEFAULT_LEVELS + 1 levels with the low-pass top
_MIN_TOP_SIZE = 8   # the coarsest level keeps at least this many pixels per side


def _check(ir: np.ndarray, vis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ir, vis = np.asarray(ir, np.float32), np.asarray(vis, np.float32)
    if ir.ndim != 2 or vis.ndim != 2:
        raise ValueError(f"baselines take grey (H, W) images, got {ir.shape} and {vis.shape}")
    if ir.shape != vis.shape:
        raise ValueError(f"infrared {ir.shape} and visible {vis.shape} differ in size")
    return ir, vis


def average(ir: np.ndarray, vis: np.ndarray) -> np.ndarray:
    """Pixel-wise mean of the two sources."""
    ir, vis = _check(ir, vis)
    return (0.5 * (ir + vis)).astype(np.float32)


def maximum(ir: np.ndarray, vis: np.ndarray) -> np.ndarray:
    """Pixel-wise maximum of the two sources."""
    ir, vis = _check(ir, vis)
    return np.maximum(ir, vis).astype(np.float32)


def _blur(x: np.ndarray) -> np.ndarray:
    y = ndimage.correlate1d(x, _BURT_KERNEL, axis=0, mode="reflect")
    return ndimage.correlate1d(y, _BURT_KERNEL, axis=1, mode="reflect")


def _reduce(x: np.ndarray) -> np.ndarray:
    """REDUCE: blur with the 5-tap kernel, keep every other row and column ((H+1)//2, (W+1)//2)."""
    return _blur(x)[::2, ::2]


def _expand(x: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """EXPAND: put x on the even pixels of a zero image of `shape`, blur, scale by 4."""
    up = np.zeros(shape, np.float64)
    up[::2, ::2] = x
    return 4.0 * _blur(up)


def pyramid_levels(shape: tuple[int, int], levels: int = DEFAULT_LEVELS) -> int:
    """Detail levels actually used: `levels`, fewer if the top would get smaller than 8 pixels."""
    n, side = 0, min(shape)
    while n < levels and (side + 1) // 2 >= _MIN_TOP_SIZE:
        side = (side + 1) // 2
        n += 1
    return n


def laplacian_pyramid_decompose(x: np.ndarray, levels: int) -> list[np.ndarray]:
    """[L_0, ..., L_{levels-1}, G_levels]: Burt-Adelson Laplacian pyramid (finest first)."""
    pyr, g = [], np.asarray(x, np.float64)
    for _ in range(levels):
        low = _reduce(g)
        pyr.append(g - _expand(low, g.shape))
        g = low
    pyr.append(g)
    return pyr


def laplacian_pyramid_reconstruct(pyr: list[np.ndarray]) -> np.ndarray:
    g = pyr[-1]
    for lap in reversed(pyr[:-1]):
        g = lap + _expand(g, lap.shape)
    return g


def laplacian_pyramid(ir: np.ndarray, vis: np.ndarray, levels: int = DEFAULT_LEVELS) -> np.ndarray:
    """Laplacian-pyramid fusion (P. J. Burt, E. H. Adelson, "The Laplacian pyramid as a compact image
    code", IEEE Trans. Communications 31(4), 1983; fusion rule as in Burt & Kolczynski, ICCV 1993):
    both sources decomposed with the 5-tap generating kernel (a = 0.4, reflect borders) into
    `levels` = 4 detail levels plus the low-pass top (fewer for images whose top level would fall
    below 8 pixels), the top levels averaged, each detail coefficient taken from the source with the
    larger absolute value; reconstruction clipped to [0, 1]."""
    ir, vis = _check(ir, vis)
    n = pyramid_levels(ir.shape, levels)
    pa, pb = laplacian_pyramid_decompose(ir, n), laplacian_pyramid_decompose(vis, n)
    fused = [np.where(np.abs(a) >= np.abs(b), a, b) for a, b in zip(pa[:-1], pb[:-1])]
    fused.append(0.5 * (pa[-1] + pb[-1]))
    return np.clip(laplacian_pyramid_reconstruct(fused), 0.0, 1.0).astype(np.float32)


BASELINES: dict[str, Baseline] = {
    "average": average,
    "max": maximum,
    "laplacian_pyramid": laplacian_pyramid,
}
