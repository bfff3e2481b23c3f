"""The fusion loss of DESIGN.md section 5 (and the released code's variant, section 4).

L = w_ssim L_ssim + w_intensity L_int + w_gradient L_grad, on images (B, H, W, 1) in model range.

The released code (the authors' loss.py, github.com/Zhishe-Wang/DMFuse) differs from the paper in
more than the weights: its SSIM weights are the Sobel magnitudes' BATCH means (one pair of weights for
the batch), and its SSIM is zero-padded 'same' filtering with C1 = 0.01^2, C2 = 0.03^2 whatever the
data range, averaged over the batch. `fusion_loss_config('released_code')` selects all of that.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dmfuse_jax.data.images import INPUT_RANGES
from dmfuse_jax.evaluation.metrics.gradient import QABF_SIGMOIDS

SOBEL_X = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float32)
SOBEL_Y = SOBEL_X.T


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(x ** 2) / (2 * sigma ** 2))
    return (g / g.sum()).astype(np.float32)


SSIM_PADDINGS = ("valid", "same")
SSIM_CONSTANTS = ("data_range", "unit")


def _filter(x: jax.Array, kernel_1d: np.ndarray, padding: str = "valid") -> jax.Array:
    """Separable filtering of (B, H, W, C), per channel: 'valid' (only positions where the window fits)
    or 'same' (zero padding, same size, as torch's conv2d with padding = size // 2)."""
    c = x.shape[-1]
    k = jnp.asarray(kernel_1d)
    kh = jnp.tile(k.reshape(-1, 1, 1, 1), (1, 1, 1, c))
    kw = jnp.tile(k.reshape(1, -1, 1, 1), (1, 1, 1, c))
    dn = ("NHWC", "HWIO", "NHWC")
    pad = padding.upper()
    x = jax.lax.conv_general_dilated(x, kh, (1, 1), pad, dimension_numbers=dn, feature_group_count=c)
    return jax.lax.conv_general_dilated(x, kw, (1, 1), pad, dimension_numbers=dn, feature_group_count=c)


def ssim(a: jax.Array, b: jax.Array, data_range: float, win_size: int = 11, sigma: float = 1.5,
         padding: str = "valid") -> jax.Array:
    """Mean SSIM per image (Wang et al. 2004), Gaussian window, C1 = (0.01 L)^2, C2 = (0.03 L)^2 with
    L = data_range; padding 'valid' (positions where the window fits) or 'same' (zero padded, every
    pixel, as the released code's ssim).

    a, b: (B, H, W, C) with H, W >= win_size for 'valid'. Returns (B,).
    """
    if padding not in SSIM_PADDINGS:
        raise ValueError(f"unknown SSIM padding {padding!r} (expected one of {', '.join(SSIM_PADDINGS)})")
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    win = gaussian_window(win_size, sigma)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = _filter(a, win, padding), _filter(b, win, padding)
    s_aa = _filter(a * a, win, padding) - mu_a ** 2
    s_bb = _filter(b * b, win, padding) - mu_b ** 2
    s_ab = _filter(a * b, win, padding) - mu_a * mu_b
    m = ((2 * mu_a * mu_b + c1) * (2 * s_ab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (s_aa + s_bb + c2))
    return jnp.mean(m, axis=(1, 2, 3))


def sobel_xy(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sobel_x and Sobel_y responses of (B, H, W, C), zero padded, same size."""
    c = x.shape[-1]
    k = np.stack([SOBEL_X, SOBEL_Y], axis=-1)[:, :, None, :]  # (3, 3, 1, 2)
    k = jnp.asarray(np.tile(k, (1, 1, 1, c)))  # (3, 3, 1, 2C), per-channel groups
    out = jax.lax.conv_general_dilated(x.astype(jnp.float32), k, (1, 1), ((1, 1), (1, 1)),
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)
    return out[..., 0::2], out[..., 1::2]


def sobel_magnitude(x: jax.Array) -> jax.Array:
    """|Sobel_x| + |Sobel_y| of (B, H, W, C), zero padded, same size."""
    gx, gy = sobel_xy(x)
    return jnp.abs(gx) + jnp.abs(gy)


def fusion_loss(fused: jax.Array, ir: jax.Array, vi: jax.Array, *, w_ssim: float = 1.0,
                w_intensity: float = 4.0, w_gradient: float = 20.0, intensity_target: str = "mean",
                ssim_weighting: str = "fixed", data_range: float = 2.0, ssim_padding: str = "valid",
                ssim_constants: str = "data_range") -> tuple[jax.Array, dict]:
    """fused, ir, vi: (B, H, W, 1) in model range (data_range = 2 for [-1, 1], 1 for [0, 1]).

    ssim_weighting: 'fixed' (0.5, 0.5) or 'gradient' (each source's mean Sobel magnitude over the whole
    batch, normalised: one pair of weights per batch, as the released code; 0.5 each if both are flat).
    ssim_padding: 'valid' or 'same' (see `ssim`). ssim_constants: 'data_range' (C from data_range) or
    'unit' (C1 = 0.01^2, C2 = 0.03^2 whatever the range, as the released code).

    Returns (scalar loss, {'loss_ssim', 'loss_intensity', 'loss_gradient', 'ssim_ir', 'ssim_vi'}).
    """
    if ssim_constants not in SSIM_CONSTANTS:
        raise ValueError(f"unknown ssim_constants {ssim_constants!r} (expected one of {', '.join(SSIM_CONSTANTS)})")
    fused, ir, vi = (t.astype(jnp.float32) for t in (fused, ir, vi))
    ssim_range = data_range if ssim_constants == "data_range" else 1.0
    ssim_ir = ssim(fused, ir, ssim_range, padding=ssim_padding)
    ssim_vi = ssim(fused, vi, ssim_range, padding=ssim_padding)
    g_f, g_ir, g_vi = sobel_magnitude(fused), sobel_magnitude(ir), sobel_magnitude(vi)
    if ssim_weighting == "fixed":
        w_ir = w_vi = 0.5
    elif ssim_weighting == "gradient":  # released code: torch.mean over the whole batch, no epsilon
        m_ir, m_vi = jnp.mean(g_ir), jnp.mean(g_vi)
        den = m_ir + m_vi
        w_ir = jnp.where(den > 0, m_ir / jnp.where(den > 0, den, 1.0), 0.5)
        w_vi = 1.0 - w_ir
    else:
        raise ValueError(f"unknown ssim_weighting {ssim_weighting!r} (expected 'fixed' or 'gradient')")
    loss_ssim = jnp.mean(w_ir * (1 - ssim_ir) + w_vi * (1 - ssim_vi))
    if intensity_target == "mean":
        target = 0.5 * (ir + vi)
    elif intensity_target == "max":
        target = jnp.maximum(ir, vi)
    else:
        raise ValueError(f"unknown intensity_target {intensity_target!r} (expected 'mean' or 'max')")
    loss_int = jnp.mean(jnp.abs(fused - target))
    loss_grad = jnp.mean(jnp.abs(g_f - jnp.maximum(g_ir, g_vi)))
    total = w_ssim * loss_ssim + w_intensity * loss_int + w_gradient * loss_grad
    return total, dict(loss_ssim=loss_ssim, loss_intensity=loss_int, loss_gradient=loss_grad,
                       ssim_ir=jnp.mean(ssim_ir), ssim_vi=jnp.mean(ssim_vi))


def recolour(y: jax.Array, chroma: jax.Array, lo: float, hi: float, leak: float = 0.05) -> jax.Array:
    """A luma (B, H, W, 1) recoloured with colour offsets (B, H, W, 3) (RGB minus luma, as
    `PairedPatchSource(chroma=True)` gives them), clipped to the model range [lo, hi] as the written
    image is (`ycbcr_to_rgb`). The value is the clipped one; the gradient gets `leak` more everywhere
    (`leak` where the clip is flat), so that a clipped channel still pulls the luma back into range."""
    c = y + chroma
    clipped = jnp.clip(c, lo, hi)
    return clipped + leak * (c - jax.lax.stop_gradient(c))


def colour_gradient_loss(fused: jax.Array, ir: jax.Array, vi: jax.Array, vi_chroma: jax.Array,
                         lo: float, hi: float) -> jax.Array:
    """The gradient term on the recoloured image, per colour channel: mean | |grad F_c| -
    max(|grad ir|, |grad vi_c|) |, with F = recolour(fused) and vi_c = vi + chroma_c (the visible
    image's own channel). For a grey visible image (zero offsets) it is the luma gradient term.

    Why (docs/evaluation.md, "MRI-PET Qabf"): the written medical image is the fused luma recoloured
    with PET's chroma, and the field scores it per R, G, B channel. A fused luma darker than PET's
    where PET is bright clips PET's blue (or red) channel to zero and loses its edges there, which
    the luma loss never sees.

    fused, ir, vi: (B, H, W, 1); vi_chroma: (B, H, W, 3); all in model range. Returns a scalar."""
    fused, ir, vi, vi_chroma = (t.astype(jnp.float32) for t in (fused, ir, vi, vi_chroma))
    f_rgb = recolour(fused, vi_chroma, lo, hi)
    vi_rgb = vi + vi_chroma
    return jnp.mean(jnp.abs(sobel_magnitude(f_rgb) - jnp.maximum(sobel_magnitude(ir), sobel_magnitude(vi_rgb))))


def _strength_orientation(x: jax.Array, eps: float = 1e-3) -> tuple[jax.Array, jax.Array]:
    """Sobel strength sqrt(gx^2 + gy^2) and orientation atan(gy / gx) of (B, H, W, C), zero padded,
    as Qabf measures them; gx is held at +-eps where it is smaller, so the orientation's gradient
    stays finite (the metric's gx == 0 rule is pi/2, the same limit)."""
    gx, gy = sobel_xy(x)
    g = jnp.sqrt(gx * gx + gy * gy + 1e-12)
    gx_safe = jnp.where(jnp.abs(gx) < eps, jnp.where(gx < 0, -eps, eps), gx)
    return g, jnp.arctan(gy / gx_safe)


def _preservation(gs, as_, gf, af):
    """Qabf's per-pixel edge preservation of a source (strength gs, orientation as_) in F."""
    tg, kg, dg, ta, ka, da = QABF_SIGMOIDS  # the metric's own constants
    g = jnp.minimum(gs, gf) / jnp.maximum(jnp.maximum(gs, gf), 1e-6)
    a = 1.0 - jnp.abs(as_ - af) / (np.pi / 2)
    return (tg * jax.nn.sigmoid(-kg * (g - dg))) * (ta * jax.nn.sigmoid(-ka * (a - da)))


def edge_preservation_loss(fused: jax.Array, ir: jax.Array, vi: jax.Array, vi_chroma: jax.Array,
                           lo: float, hi: float) -> jax.Array:
    """1 - Qabf of the recoloured image, per colour channel against (ir, vi_c), mean over the batch
    and the channels: Xydeas & Petrovic's edge strength and orientation preservation, weighted by
    the sources' Sobel strengths, made differentiable (min/max ratio, guarded orientation). Images
    are taken to [0, 1] first so that the zero padding at the patch border is black, as the metric
    pads 8-bit images.

    Why (docs/evaluation.md, "MRI-PET Qabf: an edge-preservation term"): the gradient terms ask for
    |grad F| = max(|grad ir|, |grad vi|) per pixel, a target no image meets and that says nothing
    of orientation; Qabf rewards keeping each source's edges, strength and direction, which a
    blend of two edges loses for both and a choice keeps for one. On the medical train split the
    gradient and colour terms plateaued 0.03 below the `max` rule there.

    fused, ir, vi: (B, H, W, 1); vi_chroma: (B, H, W, 3); model range [lo, hi]. Returns a scalar."""
    fused, ir, vi, vi_chroma = (t.astype(jnp.float32) for t in (fused, ir, vi, vi_chroma))
    scale = 1.0 / (hi - lo)
    f_rgb = (recolour(fused, vi_chroma, lo, hi) - lo) * scale
    vi_rgb = (jnp.clip(vi + vi_chroma, lo, hi) - lo) * scale
    ir01 = jnp.broadcast_to((ir - lo) * scale, f_rgb.shape)
    gf, af = _strength_orientation(f_rgb)
    ga, aa = _strength_orientation(vi_rgb)
    gb, ab = _strength_orientation(ir01)
    num = jnp.sum(_preservation(ga, aa, gf, af) * ga + _preservation(gb, ab, gf, af) * gb, axis=(1, 2))
    den = jnp.sum(ga + gb, axis=(1, 2))
    q = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 1.0)  # (B, 3)
    return jnp.mean(1.0 - q)


def fusion_loss_from_config(fused, ir, vi, loss_config, input_range: str = "-1_1", vi_chroma=None):
    """`fusion_loss` with weights/target/weighting/SSIM form from `config.loss` and the data range from
    the model's input range. Configs saved before ssim_padding / ssim_constants existed get the
    paper's ('valid', 'data_range'). With loss.w_colour > 0 (and vi_chroma (B, H, W, 3)) it adds
    w_colour x `colour_gradient_loss`; with loss.w_edge > 0, w_edge x `edge_preservation_loss`."""
    w_colour = float(loss_config.get("w_colour", 0.0))
    w_edge = float(loss_config.get("w_edge", 0.0))
    for key, w in (("w_colour", w_colour), ("w_edge", w_edge)):
        if w > 0 and vi_chroma is None:
            raise ValueError(f"loss.{key} > 0 needs the visible images' colour offsets (batch['vi_chroma'])")
    total, aux = fusion_loss(fused, ir, vi, w_ssim=loss_config.w_ssim, w_intensity=loss_config.w_intensity,
                       w_gradient=loss_config.w_gradient, intensity_target=loss_config.intensity_target,
                       ssim_weighting=loss_config.ssim_weighting,
                       ssim_padding=loss_config.get("ssim_padding", "valid"),
                       ssim_constants=loss_config.get("ssim_constants", "data_range"),
                       data_range=2.0 if input_range == "-1_1" else 1.0)
    lo, hi = INPUT_RANGES[input_range]
    if w_colour > 0:
        aux["loss_colour"] = colour_gradient_loss(fused, ir, vi, vi_chroma, lo, hi)
        total = total + w_colour * aux["loss_colour"]
    if w_edge > 0:
        aux["loss_edge"] = edge_preservation_loss(fused, ir, vi, vi_chroma, lo, hi)
        total = total + w_edge * aux["loss_edge"]
    return total, aux
