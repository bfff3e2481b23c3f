"""Similarity metrics VIFB does not define: CC, SCD, MS_SSIM (Wang's msssim.m, and the multi-exposure
MEF-SSIM variant behind the DMFuse paper's figure) and VIF (Han's VIFF).
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


