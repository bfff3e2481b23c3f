"""The background check of medical fusion (issue 23): does black stay black?

Over the pixels where both sources are black (luma at most 2/255; Harvard MRI: about half of each
image), the mean fused luma should stay near 0 (the must-show: at most 3/255). Images are numpy float
arrays in [0, 1], (H, W), (H, W, 1) or (H, W, 3); colour images count by their BT.601 luma, the one
grey conversion of the package (a PET/SPECT background is neutral black, so its luma is its value).
"""
from __future__ import annotations

import numpy as np

from dmfuse_jax.data.images import luma

BLACK = 2 / 255  # a source pixel at most this is black (8-bit level 2)


def _grey(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x if x.ndim == 2 else luma(x)[..., 0]


def black_mask(a, b, threshold: float = BLACK) -> np.ndarray:
    """(H, W) bool: both sources at most `threshold` (a half-level margin absorbs 8-bit rounding)."""
    eps = 0.5 / 255
    return (_grey(a) <= threshold + eps) & (_grey(b) <= threshold + eps)


def background_level(fused, a, b, threshold: float = BLACK) -> tuple[float, float]:
    """-> (mean fused luma over the both-black pixels, in [0, 1]; the share of such pixels). NaN mean
    when no pixel is black in both."""
    mask = black_mask(a, b, threshold)
    share = float(mask.mean())
    return (float(_grey(fused)[mask].mean()) if mask.any() else float("nan")), share
