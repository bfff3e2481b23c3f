"""Which image plays which role, and colour: grey pairs, colour visible images (YCbCr route of
DESIGN.md section 1) and medical pairs (the colour image keeps its chroma, wherever it is).

All images here are numpy float32 in [0, 1], (H, W, 1) grey or (H, W, 3) RGB. The model only ever
sees luminance: `prepare_pair` splits a pair into the two (H, W, 1) model inputs plus the chroma
to put back; `finish` turns the fused luminance into the output image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from dmfuse_jax.data.images import luma, map_high_bit_depth, rgb_to_ycbcr, ycbcr_to_rgb
from dmfuse_jax.errors import UserError


class FuseInputError(UserError, ValueError):
    """A bad image given to the Python API or the CLI (names the image and the problem)."""


def is_colour(x: np.ndarray) -> bool:
    return x.shape[-1] == 3


# A route decides, for one pair (first = --ir, second = --vis), which image takes the model's
# infrared role and which the visible role. The visible-role image keeps its chroma if it has any.
Route = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, bool]]


def _route_ir_vis(first, second):
    """Roles as given; a colour infrared image (e.g. a pseudo-colour palette) is used as its luma."""
    return first, second, False


def _route_colour_keeps_chroma(first, second):
    """The colour image takes the visible role and keeps its chroma, on whichever side it was given
    (MRI + PET/SPECT: the functional colour image); both grey or both colour: roles as given."""
    if is_colour(first) and not is_colour(second):
        return second, first, True
    return first, second, False


MODES: dict[str, tuple[Route, str]] = {
    "auto": (_route_colour_keeps_chroma, "the colour image of a pair keeps its chroma, whichever side it is on"),
    "ir-vis": (_route_ir_vis, "first = infrared (used as grey), second = visible (keeps its colour)"),
    "medical": (_route_colour_keeps_chroma, "grey MRI/CT in the infrared role, colour PET/SPECT in the "
                                            "visible role keeping its chroma, whichever side it is on"),
}


@dataclass
class PreparedPair:
    """ir, vi: (H, W, 1) model inputs in [0, 1]; chroma: (H, W, 2) Cb, Cr to put back, or None."""

    ir: np.ndarray
    vi: np.ndarray
    chroma: np.ndarray | None
    swapped: bool


def prepare_pair(first: np.ndarray, second: np.ndarray, mode: str = "auto") -> PreparedPair:
    """first (--ir), second (--vis): (H, W, 1 | 3) in [0, 1], same H and W."""
    try:
        route = MODES[mode][0]
    except KeyError:
        raise ValueError(f"unknown mode {mode!r} (expected one of {', '.join(MODES)})") from None
    ir_role, vi_role, swapped = route(first, second)
    chroma = None
    if is_colour(vi_role):
        ycc = rgb_to_ycbcr(vi_role).astype(np.float32)
        chroma = ycc[..., 1:]
    return PreparedPair(luma(ir_role), luma(vi_role), chroma, swapped)


def finish(fused_y: np.ndarray, pair: PreparedPair) -> np.ndarray:
    """Fused luminance (H, W, 1) -> output in [0, 1]: (H, W) grey, or (H, W, 3) RGB with the chroma
    of the colour image put back."""
    y = np.clip(np.asarray(fused_y, np.float32), 0.0, 1.0)
    if pair.chroma is None:
        return y[..., 0]
    return ycbcr_to_rgb(np.concatenate([y, pair.chroma], axis=-1)).astype(np.float32)


def normalise_array(x, name: str, *, sixteen_bit: str = "minmax") -> np.ndarray:
    """A numpy image given to the Python API -> float32 (H, W, 1 | 3) in [0, 1].

    uint8: / 255. uint16 (and other integers wider than 8 bits): as `read_image` maps 16-bit files
    ('minmax': the image's own min..max -> 0..1; 'full': / 65535). bool: 0/1. float: must already
    lie in [0, 1]. Shapes: (H, W), (H, W, 1), (H, W, 3), (H, W, 4) (RGBA: composited on black, as
    files are: `images.composite_on_black`). RGB with three equal channels counts as grey.
    """
    x = np.asarray(x)
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3 or x.shape[-1] not in (1, 3, 4):
        raise FuseInputError(f"{name}: unsupported image shape {x.shape} (expected (H, W), (H, W, 1), "
                             "(H, W, 3) or (H, W, 4) RGBA)")
    alpha = None
    if x.shape[-1] == 4:
        x, alpha = x[..., :3], x[..., 3:]
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    elif x.dtype == bool:
        x = x.astype(np.float32)
    elif np.issubdtype(x.dtype, np.integer):
        x = map_high_bit_depth(x, sixteen_bit)
    elif np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
        if not np.all(np.isfinite(x)):
            raise FuseInputError(f"{name}: contains NaN or infinite values")
        if x.min() < -1e-6 or x.max() > 1 + 1e-6:
            raise FuseInputError(f"{name}: float values must lie in [0, 1] (got {x.min():.4g}..{x.max():.4g}); "
                                 "pass uint8/uint16 or scale the image")
        x = np.clip(x, 0.0, 1.0)
    else:
        raise FuseInputError(f"{name}: unsupported dtype {x.dtype}")
    if alpha is not None:
        from dmfuse_jax.data.images import composite_on_black
        x = composite_on_black(x, alpha)
    if x.shape[0] < 2 or x.shape[1] < 2:
        raise FuseInputError(f"{name}: image is too small ({x.shape[1]}x{x.shape[0]})")
    if x.shape[-1] == 3 and np.array_equal(x[..., 0], x[..., 1]) and np.array_equal(x[..., 0], x[..., 2]):
        x = x[..., :1]
    return np.ascontiguousarray(x, np.float32)


def resize_to(x: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(H, W, C) in [0, 1] -> (shape[0], shape[1], C), bicubic (PIL, per channel, float), clipped."""
    from PIL import Image

    if x.shape[:2] == tuple(shape):
        return x
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(x[..., c], np.float32)).resize(
        (shape[1], shape[0]), Image.Resampling.BICUBIC)) for c in range(x.shape[-1])]
    return np.clip(np.stack(chans, axis=-1), 0.0, 1.0).astype(np.float32)


def match_sizes(ir: np.ndarray, vis: np.ndarray, *, resize: bool, ir_name: str, vis_name: str) -> np.ndarray:
    """The infrared image at the visible image's size: resized with `resize`, else an error."""
    if ir.shape[:2] == vis.shape[:2]:
        return ir
    if not resize:
        raise FuseInputError(f"{ir_name}: size {ir.shape[1]}x{ir.shape[0]} differs from {vis_name} "
                             f"({vis.shape[1]}x{vis.shape[0]}); register the pair or pass --resize "
                             "(resize=True) to resize the infrared image to the visible size")
    return resize_to(ir, vis.shape[:2])
