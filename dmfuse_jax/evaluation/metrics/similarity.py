"""Similarity metrics VIFB does not define: CC, SCD, MS_SSIM (Wang's msssim.m), MS_SSIM_MEF (the
multi-exposure MEF-SSIM variant behind the DMFuse paper's "MS-SSIM") and VIF (Han's VIFF).
Signature: `fn(ir, vis, fused) -> float` on float64 (H, W) 8-bit grey values."""
from __future__ import annotations

import numpy as np

from dmfuse_jax.evaluation.metrics._common import _corr, _fspecial_gaussian, _gauss_valid, _ssim_maps


# ------------------------------------------------------------------- metrics VIFB does not define


def correlation_coefficient(ir: np.ndarray, vis: np.ndarray, fused: np.ndarray) -> float:
    """CC: (corr(ir, F) + corr(vis, F)) / 2, Pearson correlation over all pixels.

    Ref: M. Deshmukh, U. Bhosale, "Image fusion and image quality assessment of fused images", Int. J.
    Image Processing 4(5) 484-508, 2010; the two-source mean as in the field's Python evaluators."""
    return (_corr(ir, fused) + _corr(vis, fused)) / 2.0


def scd(ir: np.ndarray, vis: np.ndarray, fused: np.ndarray) -> float:
    """SCD: corr(F - vis, ir) + corr(F - ir, vis), the sum of the correlations of differences.

    Ref: V. Aslantas, E. Bendes, "A new image quality metric for image fusion: the sum of the
    correlations of differences", AEU Int. J. Electronics and Communications 69(12) 1890-1896, 2015."""
    return _corr(fused - vis, ir) + _corr(fused - ir, vis)


# --- MS-SSIM

_MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _halve(x: np.ndarray) -> np.ndarray:
    """msssim.m's downsampling: imfilter(x, ones(2)/4, 'symmetric', 'same') then every other pixel."""
    x = np.pad(x, ((0, x.shape[0] % 2), (0, x.shape[1] % 2)), mode="symmetric")
    return 0.25 * (x[0::2, 0::2] + x[1::2, 0::2] + x[0::2, 1::2] + x[1::2, 1::2])


def ms_ssim_single(a: np.ndarray, b: np.ndarray) -> float:
    """Multi-scale SSIM of two grey images (Wang, Simoncelli, Bovik 2003), 5 scales with weights
    (0.0448, 0.2856, 0.3001, 0.2363, 0.1333): prod_{j<5} cs_j^w_j * ssim_5^w_5, each scale as
    `_ssim_maps` (11x11 Gaussian, sigma 1.5, K = (0.01, 0.03), L = 255, 'valid'), 2x2 mean
    downsampling as Wang's msssim.m. Negative terms are clipped to 0 before the power (as
    pytorch_msssim; MATLAB would return a complex number). Needs both sides >= 176 pixels."""
    if min(a.shape) < 11 * 2 ** 4:
        raise ValueError(f"image of {a.shape[1]}x{a.shape[0]} is too small for 5-scale MS-SSIM "
                         f"(needs at least 176 pixels per side)")
    value = 1.0
    for level, w in enumerate(_MS_SSIM_WEIGHTS):
        ssim_map, cs_map = _ssim_maps(a, b)
        term = np.mean(ssim_map) if level == len(_MS_SSIM_WEIGHTS) - 1 else np.mean(cs_map)
        value *= max(float(term), 0.0) ** w
        a, b = _halve(a), _halve(b)
    return value


def ms_ssim(ir: np.ndarray, vis: np.ndarray, fused: np.ndarray) -> float:
    """MS_SSIM: (MS-SSIM(ir, F) + MS-SSIM(vis, F)) / 2, the form fusion papers report.

    Ref: Z. Wang, E. P. Simoncelli, A. C. Bovik, "Multiscale structural similarity for image quality
    assessment", 37th Asilomar Conf. Signals, Systems and Computers, 1398-1402, 2003 (msssim.m)."""
    return (ms_ssim_single(ir, fused) + ms_ssim_single(vis, fused)) / 2.0


# --- VIF (VIFF)


def _vid_vind_g(ref: np.ndarray, dist: np.ndarray, sigma_nsq: float):
    out = []
    for scale in range(1, 5):
        n = 2 ** (4 - scale + 1) + 1
        g = _fspecial_gaussian(n, n / 5.0)
        if scale > 1:
            ref = _gauss_valid(ref, g)[::2, ::2]
            dist = _gauss_valid(dist, g)[::2, ::2]
        mu1, mu2 = _gauss_valid(ref, g), _gauss_valid(dist, g)
        s1 = np.maximum(_gauss_valid(ref * ref, g) - mu1 * mu1, 0.0)
        s2 = np.maximum(_gauss_valid(dist * dist, g) - mu2 * mu2, 0.0)
        s12 = _gauss_valid(ref * dist, g) - mu1 * mu2
        gain = s12 / (s1 + 1e-10)
        sv = s2 - gain * s12
        low1 = s1 < 1e-10
        gain[low1] = 0.0
        sv[low1] = s2[low1]
        s1[low1] = 0.0
        low2 = s2 < 1e-10
        gain[low2] = 0.0
        sv[low2] = 0.0
        neg = gain < 0
        sv[neg] = s2[neg]
        gain[neg] = 0.0
        sv[sv <= 1e-10] = 1e-10
        vid = np.log10(1.0 + gain * gain * s1 / (sv + sigma_nsq))
        vind = np.log10(1.0 + s1 / sigma_nsq)
        out.append((vid, vind, gain))
    return out


def vif(ir: np.ndarray, vis: np.ndarray, fused: np.ndarray) -> float:
    """VIF: VIFF, the visual-information-fidelity fusion metric: per scale (4 scales, Gaussian windows
    of 2^(5-s)+1 taps, sigma = taps/5), pick per position the source with the smaller gain g, sum
    VID and VIND, F_s = VID / VIND, result = sum_s p_s F_s with p = (1, 0, 0.15, 1) / 2.15, visual
    noise 0.005 * 255^2, C = 1e-7. Source order: ir = Im1, vis = Im2 (ties in g take vis).

    Ref: Y. Han, Y. Cai, Y. Cao, X. Xu, "A new image fusion performance metric based on visual
    information fidelity", Information Fusion 14(2) 127-135, 2013 (VIFF_Public.m, step for step)."""
    sq, c = 0.005 * 255.0 * 255.0, 1e-7
    p = np.array([1.0, 0.0, 0.15, 1.0]) / 2.15
    s1 = _vid_vind_g(ir, fused, sq)
    s2 = _vid_vind_g(vis, fused, sq)
    f = np.empty(4)
    for i, ((z1, m1, g1), (z2, m2, g2)) in enumerate(zip(s1, s2)):
        take1 = g1 < g2
        z12 = np.where(take1, z1, z2)
        m12 = np.where(take1, m1, m2)
        f[i] = np.sum(z12 + c) / np.sum(m12 + c)
    return float(np.sum(f * p))




# --- MS_SSIM_MEF: the multi-exposure-fusion MS-SSIM behind the DMFuse paper's "MS-SSIM"

_MEF_WEIGHTS = np.array([0.0448, 0.2856, 0.3001]) / (0.0448 + 0.2856 + 0.3001)
_MEF_WIN = 11


def _box_valid(x: np.ndarray) -> np.ndarray:
    """filter2(ones(11)/121, x, 'valid')."""
    return _gauss_valid(x, np.full(_MEF_WIN, 1.0 / _MEF_WIN))


def _mef_ssim(sources: list[np.ndarray], f: np.ndarray) -> float:
    """Ma, Zeng, Wang's mef_ssim.m (K = 0.03, 11x11 Gaussian window, sigma 1.5), vectorised: per 11x11
    window the sources' mean-removed patches are combined into one reference patch (weights from their
    contrast and a structure-consistency exponent, rescaled to the largest contrast), and the score is
    the contrast-structure term of SSIM between that patch and the fused patch. Each window's reference
    patch is a linear combination of the source patches, so its (Gaussian-weighted) statistics follow
    from the sources' local covariances without forming the patches."""
    eps = np.finfo(np.float64).eps
    n2 = _MEF_WIN * _MEF_WIN
    k = len(sources)
    mu = [_box_valid(x) for x in sources]
    box_cov = [[_box_valid(sources[a] * sources[b]) - mu[a] * mu[b] for b in range(k)] for a in range(k)]
    # ed: the patch's contrast, norm(x - mu) + 0.001 (square window)
    ed = [np.sqrt(np.maximum(n2 * box_cov[a][a], 0.0)) + 0.001 for a in range(k)]
    denominator = sum(np.sqrt(np.maximum(n2 * box_cov[a][a], 0.0)) for a in range(k))
    total = sum(sources)
    mu_t = _box_valid(total)
    numerator = np.sqrt(np.maximum(n2 * (_box_valid(total * total) - mu_t * mu_t), 0.0))
    r = (numerator + eps) / (denominator + eps)
    r = np.where(r > 1, 1 - eps, np.where(r < 0, eps, r))
    p = np.minimum(np.tan(np.pi / 2 * r), 10.0)
    w = [(e / _MEF_WIN) ** p + eps for e in ed]
    w_sum = sum(w)
    coef = [wa / w_sum / ea for wa, ea in zip(w, ed)]  # reference patch = sum_a coef_a (x_a - mu_a)
    norm2 = sum(coef[a] * coef[b] * n2 * box_cov[a][b] for a in range(k) for b in range(k))
    norm = np.sqrt(np.maximum(norm2, 0.0))
    scale = np.where(norm > 0, np.maximum.reduce(ed) / np.where(norm > 0, norm, 1.0), 1.0)
    coef = [c * scale for c in coef]
    # Gaussian-weighted covariances of the sources and the fused image, 'valid' (the window positions)
    g_mu = [_gauss_valid(x, _G1_MEF) for x in sources]
    g_f = _gauss_valid(f, _G1_MEF)
    g_cov = [[_gauss_valid(sources[a] * sources[b], _G1_MEF) - g_mu[a] * g_mu[b] for b in range(k)]
             for a in range(k)]
    sigma_r2 = sum(coef[a] * coef[b] * g_cov[a][b] for a in range(k) for b in range(k))
    sigma_f2 = _gauss_valid(f * f, _G1_MEF) - g_f * g_f
    sigma_rf = sum(coef[a] * (_gauss_valid(sources[a] * f, _G1_MEF) - g_mu[a] * g_f) for a in range(k))
    c = (0.03 * 255.0) ** 2
    return float(np.mean((2.0 * sigma_rf + c) / (sigma_r2 + sigma_f2 + c)))


_G1_MEF = _fspecial_gaussian(_MEF_WIN, 1.5)


def ms_ssim_mef(ir: np.ndarray, vis: np.ndarray, fused: np.ndarray) -> float:
    """MS_SSIM_MEF: the multi-scale MEF-SSIM of the fused image against the source sequence (ir, vis):
    3 scales with weights (0.0448, 0.2856, 0.3001) / their sum, 2x2 mean downsampling as msssim.m,
    Q = prod_s max(Q_s, 0)^w_s. This is `analysis_ms_ssim(imgSeq, F)` of the analysis_Reference.m script many
    infrared-visible papers (and, by its values, the DMFuse paper's "MS-SSIM" of 0.913) use; it is not
    Wang's MS-SSIM (`MS_SSIM`). Needs both sides >= 44 pixels.

    Ref: K. Ma, K. Zeng, Z. Wang, "Perceptual quality assessment for multi-exposure image fusion", IEEE
    TIP 24(11) 3345-3356, 2015 (mef_ssim.m, analysis_ms_ssim.m)."""
    if min(fused.shape) < _MEF_WIN * 4:
        raise ValueError(f"image of {fused.shape[1]}x{fused.shape[0]} is too small for 3-scale MEF-SSIM "
                         f"(needs at least 44 pixels per side)")
    srcs, f = [ir, vis], fused
    q = []
    for level in range(len(_MEF_WEIGHTS)):
        q.append(_mef_ssim(srcs, f))
        if level < len(_MEF_WEIGHTS) - 1:
            srcs, f = [_halve(x) for x in srcs], _halve(f)
    return float(np.prod(np.maximum(np.array(q), 0.0) ** _MEF_WEIGHTS))  # (MATLAB: complex if negative)
