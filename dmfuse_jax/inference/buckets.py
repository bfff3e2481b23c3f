"""Shape buckets: pad every image up to a coarse grid of sizes so that a folder of mixed sizes
compiles one function per bucket, not one per image.

Policy: each of H and W is rounded UP to the next multiple of `multiple` (default 64; it must be a
multiple of the UNet stride, 16 for the 5-level UNet). Padding is reflection at the bottom/right
(as the model's own stride padding); the fused image is cropped back to the input size.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

DEFAULT_MULTIPLE = 64


def check_multiple(multiple: int, stride: int) -> int:
    """`multiple` must be a positive multiple of the model stride (and >= 2 strides for the export)."""
    if multiple <= 0 or multiple % stride:
        raise ValueError(f"bucket multiple {multiple} must be a positive multiple of the UNet stride {stride}")
    return multiple


def bucket_size(n: int, multiple: int) -> int:
    """Smallest multiple of `multiple` that is >= n (never below `multiple`)."""
    return max(multiple, -(-n // multiple) * multiple)


def bucket_shape(h: int, w: int, multiple: int) -> tuple[int, int]:
    return bucket_size(h, multiple), bucket_size(w, multiple)


def pad_to(x: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Reflect-pads (H, W, C) at the bottom/right to `shape` (numpy; repeats the reflection when
    the pad exceeds the image)."""
    h, w = x.shape[:2]
    ph, pw = shape[0] - h, shape[1] - w
    if ph < 0 or pw < 0:
        raise ValueError(f"cannot pad an image of {h}x{w} down to {shape[0]}x{shape[1]}")
    if ph == 0 and pw == 0:
        return x
    return np.pad(x, ((0, ph), (0, pw)) + ((0, 0),) * (x.ndim - 2), mode="reflect")


def plan_batches(sizes: Sequence[tuple[int, int]], multiple: int,
                 batch_size: int) -> list[tuple[tuple[int, int, int], list[int]]]:
    """Groups image indices by bucket and cuts each group into batches.

    Returns [((B, Hb, Wb), [indices]), ...] in order of first appearance of each bucket. B, the
    compiled batch size of a bucket, is min(batch_size, images in the bucket); a last, shorter
    batch is padded up to B by the caller, so each bucket compiles exactly once.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (h, w) in enumerate(sizes):
        groups.setdefault(bucket_shape(h, w, multiple), []).append(i)
    plan = []
    for (hb, wb), idx in groups.items():
        b = min(batch_size, len(idx))
        plan.extend(((b, hb, wb), idx[s:s + b]) for s in range(0, len(idx), b))
    return plan
