"""Shape buckets: pad every image up to a few shapes so that a folder of mixed sizes compiles a few
functions, not one per image (a compilation costs seconds on CPU, 15 s on a GPU for the 1/4 model).

Policy, in two steps:
1. each of H and W is rounded UP to the next multiple of `multiple` (default 64; it must be a
   multiple of the UNet stride, 16 for the 5-level UNet);
2. with `max_buckets` (default 3), the folder's rounded shapes are merged greedily until at most
   that many are left: each merge joins the two buckets whose union (the elementwise larger
   shape) adds the least padded area over the folder's images, i.e. the least extra compute.
Padding is reflection at the bottom/right (as the model's own stride padding); the fused image is
cropped back to the input size. A larger canvas is not free for quality: GroupNorm statistics and
the diffusion noise then cover the reflected margin too (measured in docs/speed.md, "Compile once").
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

DEFAULT_MULTIPLE = 64
DEFAULT_MAX_BUCKETS = 3


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


def merge_buckets(shapes: Sequence[tuple[int, int]], max_buckets: int) -> dict[tuple[int, int], tuple[int, int]]:
    """Maps each shape of `shapes` (one entry per image, repeats counted) to a bucket shape that
    covers it, with at most `max_buckets` distinct buckets, merging greedily by least added area."""
    if max_buckets < 1:
        raise ValueError(f"max_buckets must be >= 1, got {max_buckets}")
    # bucket shape -> (member shapes, image count)
    groups: dict[tuple[int, int], tuple[list, int]] = {}
    for s in shapes:
        members, n = groups.get(s, ([s], 0))
        groups[s] = (members, n + 1)

    def cost(shape, n):
        return shape[0] * shape[1] * n

    while len(groups) > max_buckets:
        keys = list(groups)
        best = None
        for i, a in enumerate(keys):
            for b in keys[i + 1:]:
                m = (max(a[0], b[0]), max(a[1], b[1]))
                na, nb = groups[a][1], groups[b][1]
                extra = cost(m, na + nb) - cost(a, na) - cost(b, nb)
                if best is None or extra < best[0]:
                    best = (extra, a, b, m)
        _, a, b, m = best
        (ma, na), (mb, nb) = groups.pop(a), groups.pop(b)
        old_members, old_n = groups.pop(m, ([], 0))  # the union may equal a third bucket
        groups[m] = (ma + mb + old_members, na + nb + old_n)
    return {s: bucket for bucket, (members, _) in groups.items() for s in members}


def plan_batches(sizes: Sequence[tuple[int, int]], multiple: int, batch_size: int,
                 max_buckets: int | None = None) -> list[tuple[tuple[int, int, int], list[int]]]:
    """Groups image indices by bucket (`multiple`, then merged down to `max_buckets` when given) and
    cuts each group into batches.

    Returns [((B, Hb, Wb), [indices]), ...] in order of first appearance of each bucket. B, the
    compiled batch size of a bucket, is min(batch_size, images in the bucket); a last, shorter
    batch is padded up to B by the caller, so each bucket compiles exactly once.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    base = [bucket_shape(h, w, multiple) for h, w in sizes]
    to_bucket = merge_buckets(base, max_buckets) if max_buckets else {s: s for s in base}
    groups: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(base):
        groups.setdefault(to_bucket[s], []).append(i)
    plan = []
    for (hb, wb), idx in groups.items():
        b = min(batch_size, len(idx))
        plan.extend(((b, hb, wb), idx[s:s + b]) for s in range(0, len(idx), b))
    return plan
