"""Gradient and edge metrics: Qabf (Sobel edge preservation), Qe (Piella's edge-dependent index on
Prewitt magnitudes) and FMI_pixel (Fast-FMI, on MATLAB edge(I) Sobel edge maps as the field's shared
script computes it). Signature: `fn(ir, vis, fused) -> float` on float64 (H, W) 8-bit grey values."""
from __future__ import annotations

from typing import Callable

import numpy as np
from scipy import ndimage

from dmfuse_jax.evaluation.metrics._common import _filter2_same, _local_stats, _sobel_xy, _ssim_from_stats


def _qabf_grad(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sobel strength and orientation as VIFB's Qabf (atan(y/x), pi/2 where x == 0).

    VIFB computes conv2(x, [-1 0 1; -2 0 2; -1 0 1]) and conv2(x, [1 2 1; 0 0 0; -1 -2 -1]). conv2
    flips its kernel, so its x response is minus the correlation with [-1 0 1; ...], while its y
    response equals the correlation with [-1 -2 -1; 0 0 0; 1 2 1] (`_sobel_xy`'s y kernel): only gx
    changes sign, and with it the orientation atan(gy / gx) wherever gx != 0."""
    gx, gy = _sobel_xy(x)
    gx = -gx
    g = np.sqrt(gx * gx + gy * gy)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(gx == 0, np.pi / 2, np.arctan(gy / np.where(gx == 0, 1.0, gx)))
    return g, a


# Xydeas & Petrovic's sigmoids: Tg, kg, Dg (strength), Ta, ka, Da (orientation); also the training
# loss's differentiable Qabf (training/fusion_loss.edge_preservation_loss)
QABF_SIGMOIDS = (0.9994, -15.0, 0.5, 0.9879, -22.0, 0.8)


def _qabf_preservation(gs, as_, gf, af):
    tg, kg, dg, ta, ka, da = QABF_SIGMOIDS
    with np.errstate(divide="ignore", invalid="ignore"):
        # VIFB's branch structure kept as is, including G = gF where gA == gF.
        g = np.where(gs > gf, gf / np.where(gs > gf, gs, 1.0),
                     np.where(gs == gf, gf, gs / np.where(gf > 0, gf, 1.0)))
    a = 1.0 - np.abs(as_ - af) / (np.pi / 2)
    return tg / (1.0 + np.exp(kg * (g - dg))) * (ta / (1.0 + np.exp(ka * (a - da))))


def qabf(ir: np.ndarray, vis: np.ndarray, fused: np.ndarray) -> float:
    """Qabf: gradient-based edge preservation, Sobel strength and orientation, sigmoid parameters
    Tg = 0.9994, kg = -15, Dg = 0.5, Ta = 0.9879, ka = -22, Da = 0.8, weights = source strengths (L=1).

    Ref: C. S. Xydeas, V. Petrovic, "Objective image fusion performance measure", Electronics Letters
    36(4) 308-309, 2000. VIFB metricsQabf.m, step for step (zero-padded 'same' convolution)."""
    ga, aa = _qabf_grad(vis)
    gb, ab = _qabf_grad(ir)
    gf, af = _qabf_grad(fused)
    qa = _qabf_preservation(ga, aa, gf, af)
    qb = _qabf_preservation(gb, ab, gf, af)
    den = float(np.sum(ga + gb))
    return float(np.sum(qa * ga + qb * gb)) / den if den > 0 else float("nan")

# --- Qe (Piella)


def _q_weighted(a: np.ndarray, b: np.ndarray, f: np.ndarray) -> float:
    """Piella's weighted fusion quality index Q_W as in Z. Liu's metricPeilla.m (case 2): SSIM maps of
    F against each source, lambda = sigma_a^2 / (sigma_a^2 + sigma_b^2), weights max(sigma^2) / sum."""
    st_a, st_b, st_f = _local_stats(a), _local_stats(b), _local_stats(f)
    saa, sbb = st_a[1], st_b[1]
    tie = 0.5 * ((saa + sbb) == 0)
    saa, sbb = saa + tie, sbb + tie
    lam = saa / (saa + sbb)
    ssim_af = _ssim_from_stats(f, a, st_f, st_a)[0]
    ssim_bf = _ssim_from_stats(f, b, st_f, st_b)[0]
    cw = np.maximum(saa, sbb)
    cw = cw / np.sum(cw)
    return float(np.sum(cw * (lam * ssim_af + (1.0 - lam) * ssim_bf)))


def _prewitt_magnitude(x: np.ndarray) -> np.ndarray:
    k1 = np.array([[1.0, 0.0, -1.0], [1.0, 0.0, -1.0], [1.0, 0.0, -1.0]])
    gx, gy = _filter2_same(k1, x), _filter2_same(k1.T, x)  # k1.T = [1 1 1; 0 0 0; -1 -1 -1]
    return np.sqrt(gx * gx + gy * gy)


def qe(ir: np.ndarray, vis: np.ndarray, fused: np.ndarray) -> float:
    """Qe: Piella's edge-dependent fusion quality index Q_E = Q_W(a, b, f) * Q_W(a', b', f')^alpha,
    alpha = 1, a', b', f' the Prewitt edge magnitudes ([1 0 -1] x3 and [1 1 1; 0 0 0; -1 -1 -1]).

    Ref: G. Piella, H. Heijmans, "A new quality metric for image fusion", ICIP 2003, III-173-176.
    Q_W as Z. Liu's metricPeilla.m (SSIM maps via ssim_index.m, 11x11 Gaussian, L = 255). Liu's case 3
    multiplies by an undefined Q; here Q is Q_W on the images, as the paper defines Q_E."""
    qw = _q_weighted(ir, vis, fused)
    qw_edge = _q_weighted(_prewitt_magnitude(ir), _prewitt_magnitude(vis), _prewitt_magnitude(fused))
    return qw * qw_edge


# --- FMI_pixel (Fast-FMI)


def _entropy_terms(p: np.ndarray) -> np.ndarray:
    """-p log2|p| with 0 where p == 0 (MATLAB real(-p.*log2(p)) for possibly negative p)."""
    ap = np.abs(p)
    return np.where(ap > 0, -p * np.log2(np.where(ap > 0, ap, 1.0)), 0.0)


def _fmi_windows(x: np.ndarray) -> np.ndarray:
    """All 3x3 windows of x as rows of 9 values in MATLAB column-major order: (N, 9)."""
    win = np.lib.stride_tricks.sliding_window_view(x, (3, 3))  # (H-2, W-2, 3, 3)
    return np.ascontiguousarray(win.transpose(0, 1, 3, 2)).reshape(-1, 9)


def _fmi_pdf(sub: np.ndarray) -> np.ndarray:
    lo, hi = sub.min(1, keepdims=True), sub.max(1, keepdims=True)
    flat = hi == lo
    norm = np.where(flat, 1.0, (sub - lo) / np.where(flat, 1.0, hi - lo))
    return norm / norm.sum(1, keepdims=True)


def _fmi_pair(a_sub: np.ndarray, f_sub: np.ndarray, f_pdf: np.ndarray) -> np.ndarray:
    """Fast-FMI of one source against F for a chunk of windows: (N, 9) x 2 -> (N,)."""
    a_pdf = _fmi_pdf(a_sub)
    a_cdf, f_cdf = np.cumsum(a_pdf, 1), np.cumsum(f_pdf, 1)
    at, ft = a_pdf - a_pdf.mean(1, keepdims=True), f_pdf - f_pdf.mean(1, keepdims=True)
    s_af = np.sum(at * ft, 1)
    den = np.sqrt(np.sum(at * at, 1) * np.sum(ft * ft, 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        c = np.where(s_af == 0, 0.0, s_af / den)
    idx = np.arange(1, 10, dtype=np.float64)

    def sd(p):
        return np.sqrt(np.abs(p @ (idx * idx) - (p @ idx) ** 2))

    a_sd, f_sd = sd(a_pdf), sd(f_pdf)
    fc, ac = f_cdf[:, :, None], a_cdf[:, None, :]  # i indexes F, j indexes the source
    prod = fc * ac
    pos = c >= 0
    # Frechet upper (min) and lower (max(x+y-1, 0)) copulas evaluated at the CDF grid.
    bound = np.where(pos[:, None, None], np.minimum(fc, ac), np.maximum(fc + ac - 1.0, 0.0))
    cov = np.sum(bound - prod, axis=(1, 2))
    degenerate = (a_sd == 0) | (f_sd == 0) | (pos & (c == 0))
    with np.errstate(divide="ignore", invalid="ignore"):
        mix = np.where(degenerate, 0.0, c * f_sd * a_sd / cov)  # phi (c >= 0) or theta (c < 0)
    # 2-D first differences of the bound give its probability mass per cell (zero padded at 0).
    mass = np.diff(np.pad(bound, ((0, 0), (1, 0), (1, 0))), axis=1)
    mass = np.diff(mass, axis=2)
    jpdf = mix[:, None, None] * mass + (1.0 - mix[:, None, None]) * (f_pdf[:, :, None] * a_pdf[:, None, :])
    joint = np.sum(_entropy_terms(jpdf), axis=(1, 2))
    ea, ef = np.sum(_entropy_terms(a_pdf), 1), np.sum(_entropy_terms(f_pdf), 1)
    mi = ea + ef - joint
    with np.errstate(divide="ignore", invalid="ignore"):
        fmi = np.where(mi == 0, 0.0, 2.0 * mi / (ea + ef))
    same = np.all(a_sub == f_sub, axis=1)
    return np.where(same, 1.0, fmi)


def matlab_edge_sobel(x: np.ndarray) -> np.ndarray:
    """MATLAB edge(I) with its defaults ('sobel', automatic threshold, thinning) -> 0/1 float (H, W).

    Gradients: imfilter with fspecial('sobel')/8 and its transpose, replicate padding; b = bx^2 + by^2;
    cutoff = 4 * mean(b); an interior pixel is an edge where b > cutoff and b is a local maximum
    across the dominant gradient axis (|bx| >= |by|: left <= centre > right; |by| >= |bx|: up <=
    centre > down), the thinning rule of MATLAB's edge.m; border pixels are never edges."""
    op = np.array([[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]]) / 8.0
    bx = np.abs(ndimage.correlate(x, op.T, mode="nearest"))
    by = np.abs(ndimage.correlate(x, op, mode="nearest"))
    b = bx * bx + by * by
    cutoff = 4.0 * float(np.mean(b))
    tol = 100 * np.finfo(np.float64).eps
    c = b[1:-1, 1:-1]
    horiz = (bx[1:-1, 1:-1] >= by[1:-1, 1:-1] - tol) & (b[1:-1, :-2] <= c) & (c > b[1:-1, 2:])
    vert = (by[1:-1, 1:-1] >= bx[1:-1, 1:-1] - tol) & (b[:-2, 1:-1] <= c) & (c > b[2:, 1:-1])
    e = np.zeros_like(b)
    e[1:-1, 1:-1] = (c > cutoff) & (horiz | vert)
    return e


_FMI_FEATURES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "none": lambda x: x,  # raw pixels
    "edge": matlab_edge_sobel,
}


def fmi(ir: np.ndarray, vis: np.ndarray, fused: np.ndarray, *, feature: str = "edge",
        chunk: int = 16384) -> float:
    """Fast-FMI with 3x3 sliding windows on a feature map ('edge': MATLAB edge(I); 'none': raw pixels).

    Per window the min-max normalised window is a PDF over its 9 positions (column-major), the joint
    PDF of source and fused windows is Nelsen's simplified Frechet-bound construction from their
    Pearson correlation, FMI = 2 MI / (H_a + H_f), 1 where the windows are equal; the map is the mean
    of the two sources' FMI and the result its mean. Same arithmetic as fmi.m, vectorised over the
    windows (only windows that differ from the fused window are computed)."""
    feat = _FMI_FEATURES[feature]
    fa, fb, ff = feat(vis / 255.0), feat(ir / 255.0), feat(fused / 255.0)  # im2double, as the callers
    wa, wb, wf = _fmi_windows(fa), _fmi_windows(fb), _fmi_windows(ff)
    total = float(wf.shape[0])  # every window starts at FMI 1 (equal windows) for both sources
    for w_src in (wa, wb):
        todo = np.flatnonzero(np.any(w_src != wf, axis=1))
        for s in range(0, todo.size, chunk):
            sel = todo[s:s + chunk]
            f_sub = wf[sel]
            vals = _fmi_pair(w_src[sel], f_sub, _fmi_pdf(f_sub))
            total -= float(np.sum(1.0 - vals)) / 2.0
    return total / wf.shape[0]


def fmi_pixel(ir: np.ndarray, vis: np.ndarray, fused: np.ndarray) -> float:
    """FMI_pixel, as the field reports it: Fast-FMI with 3x3 windows computed by the evaluation script
    most infrared-visible papers use (analysis_Reference.m: `FMI_pixel = analysis_fmi(A, B, F)` on
    im2double images). That call passes no feature, and analysis_fmi.m's default feature is 'edge'
    (MATLAB edge(I), Sobel), so the published "FMI_pixel" values are FMI on Sobel edge maps; this
    reproduces that convention. `fmi(..., feature='none')` gives the raw-pixel variant.

    Ref: M. Haghighat, M. A. Razian, "Fast-FMI: non-reference image fusion metric", 8th Int. Conf. on
    Application of Information and Communication Technologies (AICT), 2014; FMI: M. Haghighat,
    A. Aghagolzadeh, H. Seyedarabi, Computers and Electrical Engineering 37(5) 744-756, 2011."""
    return fmi(ir, vis, fused, feature="edge")

