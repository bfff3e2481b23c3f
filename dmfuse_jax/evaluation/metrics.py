"""The field's no-reference fusion metrics, vectorised numpy/scipy, one function per metric.

Every metric has the signature `fn(ir, vis, fused) -> float` on grey images given as float64 arrays of
shape (H, W) holding 8-bit grey values (0..255, integral; see `to_8bit_grey`). The registry `METRICS`
maps the CSV name to the function; `LOWER_IS_BETTER` names the metrics where smaller is better.

Conventions. Where the VIFB toolbox (X. Zhang, P. Ye, G. Xiao, "VIFB: A Visible and Infrared Image
Fusion Benchmark", CVPR Workshops 2020, github.com/xingchenzhang/VIFB, `metrics/metrics*.m`) defines a
metric (AG, CE, EI, EN, MI, PSNR, Qabf, Qcb, Qcv, RMSE, SF, SSIM, SD), its MATLAB code is followed
step for step (filters, paddings, bins, logarithm bases, and how the two sources are combined: SSIM and
MI are SUMS over the two sources, CE, RMSE and PSNR average them). The single deliberate departure is
RMSE/PSNR: VIFB's helper `mse` returns sqrt(sum((a-b)^2))/(H*W), which is not a mean squared error
(it shrinks with the image size, and is what makes VIFB's PSNRs sit near 57 dB); here RMSE and PSNR
are the standard quantities (see `rmse`, `psnr`). The other metrics follow their papers as
implemented in the MATLAB code the field uses: Z. Liu's imageFusionMetrics (PC via Kovesi's phase
congruency, Qe via `ssim_index`), Haghighat's fmi.m (FMI_pixel), Han's VIFF_Public.m (VIF) and
Wang's msssim.m (MS_SSIM). Each docstring says which.

Colour is handled outside these functions (`evaluate_images`): a colour image is scored on its BT.601
luminance by default, or per R, G, B channel with a grey source reused for every channel (VIFB).
"""
from __future__ import annotations

import functools
import hashlib
import math
from collections import OrderedDict
from typing import Callable

import numpy as np
from scipy import fft as sfft
from scipy import ndimage, signal

Metric = Callable[[np.ndarray, np.ndarray, np.ndarray], float]

# ----------------------------------------------------------------------------------------- helpers


def to_8bit_grey(x01: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, 1) values in [0, 1] -> float64 (H, W) of integral 8-bit values 0..255."""
    x = np.asarray(x01, np.float64)
    if x.ndim == 3:
        x = x[..., 0]
    return np.clip(np.floor(x * 255.0 + 0.5), 0.0, 255.0)


def _fspecial_gaussian(n: int, sigma: float) -> np.ndarray:
    """1-D factor of MATLAB's fspecial('gaussian', n, sigma) (the 2-D kernel is its outer product)."""
    x = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
    g = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return g / g.sum()


def _gauss_valid(x: np.ndarray, g1: np.ndarray) -> np.ndarray:
    """MATLAB filter2(outer(g1, g1), x, 'valid') for a symmetric separable kernel."""
    r = len(g1) // 2
    y = ndimage.correlate1d(x, g1, axis=0, mode="constant")
    y = ndimage.correlate1d(y, g1, axis=1, mode="constant")
    return y[r:y.shape[0] - r, r:y.shape[1] - r]


def _gauss_same(x: np.ndarray, g1: np.ndarray) -> np.ndarray:
    """MATLAB filter2(outer(g1, g1), x, 'same'): zero padding outside the image."""
    y = ndimage.correlate1d(x, g1, axis=0, mode="constant")
    return ndimage.correlate1d(y, g1, axis=1, mode="constant")


def _filter2_same(kernel: np.ndarray, x: np.ndarray) -> np.ndarray:
    """MATLAB filter2(kernel, x, 'same') for an odd-sized kernel (correlation, zero padding)."""
    return ndimage.correlate(x, np.asarray(kernel, np.float64), mode="constant", cval=0.0)


def _matlab_round(x: np.ndarray) -> np.ndarray:
    """MATLAB round (half away from zero)."""
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def _freqspace(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """MATLAB [u, v] = freqspace([rows, cols], 'meshgrid'): u varies along columns, v along rows."""
    rows, cols = shape
    fu = (np.arange(cols) - cols // 2) * (2.0 / cols)
    fv = (np.arange(rows) - rows // 2) * (2.0 / rows)
    return np.meshgrid(fu, fv)


def _centered_filter(x: np.ndarray, transfer_centered: np.ndarray) -> np.ndarray:
    """MATLAB ifft2(ifftshift(fftshift(fft2(x)) .* S)) for a filter S given with 0 Hz at the centre.

    The transfer functions used here are even in frequency, so MATLAB returns a real image; we take
    the real part (the imaginary part is rounding noise)."""
    return np.real(sfft.ifft2(sfft.fft2(x) * np.fft.ifftshift(transfer_centered)))


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two arrays (MATLAB corr2)."""
    a = a - a.mean()
    b = b - b.mean()
    den = math.sqrt(float(np.sum(a * a)) * float(np.sum(b * b)))
    return float(np.sum(a * b)) / den if den > 0 else float("nan")


def _hist256(x: np.ndarray) -> np.ndarray:
    """Probabilities of the 256 grey levels of an 8-bit image (bins on floor values, VIFB)."""
    idx = np.clip(np.floor(x), 0, 255).astype(np.int64).ravel()
    return np.bincount(idx, minlength=256).astype(np.float64) / idx.size


def _sobel_xy(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """filter2 with [-1 0 1; -2 0 2; -1 0 1] (x) and its transpose (y), zero padding ('same')."""
    kx = np.array([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    return _filter2_same(kx, x), _filter2_same(kx.T, x)


_G11 = _fspecial_gaussian(11, 1.5)
_SSIM_C1 = (0.01 * 255.0) ** 2
_SSIM_C2 = (0.03 * 255.0) ** 2


def _local_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian (11x11, sigma 1.5) local mean and variance, 'valid' region: ((H-10, W-10),) x 2."""
    if min(x.shape) < 11:
        raise ValueError(f"image of {x.shape[1]}x{x.shape[0]} is smaller than the 11x11 SSIM window")
    mu = _gauss_valid(x, _G11)
    return mu, _gauss_valid(x * x, _G11) - mu * mu


def _ssim_from_stats(a, b, stats_a, stats_b) -> tuple[np.ndarray, np.ndarray]:
    """SSIM and contrast-structure maps from precomputed local statistics of a and b."""
    (mu_a, saa), (mu_b, sbb) = stats_a, stats_b
    sab = _gauss_valid(a * b, _G11) - mu_a * mu_b
    cs = (2.0 * sab + _SSIM_C2) / (saa + sbb + _SSIM_C2)
    lum = (2.0 * mu_a * mu_b + _SSIM_C1) / (mu_a * mu_a + mu_b * mu_b + _SSIM_C1)
    return lum * cs, cs


def _ssim_maps(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Wang et al. 2004 SSIM with an 11x11 Gaussian window (sigma 1.5), K = (0.01, 0.03), L = 255,
    'valid' filtering (as ssim_index.m). Returns (ssim_map, cs_map), each (H-10, W-10)."""
    return _ssim_from_stats(a, b, _local_stats(a), _local_stats(b))


def ssim_single(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of two grey images (Wang et al. 2004), as VIFB's `ssim`."""
    return float(np.mean(_ssim_maps(a, b)[0]))


def _ssim_sum(ir: np.ndarray, vis: np.ndarray, fused: np.ndarray) -> float:
    st_f = _local_stats(fused)
    return sum(float(np.mean(_ssim_from_stats(x, fused, _local_stats(x), st_f)[0])) for x in (vis, ir))


# ------------------------------------------------------------------------- VIFB-defined metrics


def entropy(ir: np.ndarray, vis: np.ndarray, fused: np.ndarray) -> float:
    """EN: Shannon entropy (bits) of the fused image's 256-bin grey histogram (bins on floor values).

    Ref: J. van Aardt, "Assessment of image fusion procedures using entropy, image quality, and
    multispectral classification", J. Applied Remote Sensing 2(1) 023522, 2008. VIFB metricsEntropy.m.
    """
    p = _hist256(fused)
    p = p[p > 0]
    return float(-np.sum(p * np.log2(p)))


def standard_deviation(ir: np.ndarray, vis: np.ndarray, fused: np.ndarray) -> float:
    """SD: population standard deviation (divide by H*W) of the fused image.

    Ref: Y.-J. Rao, "In-fibre Bragg grating sensors", Meas. Sci. Technol. 8(4) 355, 1997 (as cited by
    VIFB). VIFB metricsVariance.m (which returns the standard deviation despite its name)."""
    return float(np.sqrt(np.mean((fused - fused.mean()) ** 2)))


def _mi_vifb(a: np.ndarray, b: np.ndarray) -> float:
    """VIFB `mutinf`: min-max stretch each image to 0..255 (rounded half away from zero), 256x256 joint
    histogram, MI = H(a) + H(b) - H(a, b) with the NATURAL logarithm (nats)."""
    def levels(x):
        lo, hi = x.min(), x.max()
        y = (x - lo) / (hi - lo) if hi != lo else np.zeros_like(x)
        return np.floor(y * 255.0 + 0.5).astype(np.int64).ravel()

    ia, ib = levels(a), levels(b)
    joint = np.bincount(ia * 256 + ib, minlength=256 * 256).astype(np.float64)
    joint /= joint.sum()
    pa, pb = joint.reshape(256, 256).sum(1), joint.reshape(256, 256).sum(0)

    def h(p):
        p = p[p > 0]
        return float(-np.sum(p * np.log(p)))

    return h(pa) + h(pb) - h(joint)


def mutual_information(ir: np.ndarray, vis: np.ndarray, fused: np.ndarray) -> float:
    """MI: MI(vis, F) + MI(ir, F), in nats (VIFB uses MATLAB's natural `log`), SUM over the sources.

    Ref: G. Qu, D. Zhang, P. Yan, "Information measure for performance of image fusion", Electronics
    Letters 38(7) 313-315, 2002. VIFB metricsMutinf.m (images min-max stretched to 0..255 first)."""
    return _mi_vifb(vis, fused) + _mi_vifb(ir, fused)


def structural_similarity(ir: np.ndarray, vis: np.ndarray, fused: np.ndarray) -> float:
    """SSIM: SSIM(vis, F) + SSIM(ir, F), the SUM over the two sources (so at most 2), as VIFB.

    Ref: Z. Wang, A. C. Bovik, H. R. Sheikh, E. P. Simoncelli, "Image quality assessment: from error
    visibility to structural similarity", IEEE TIP 13(4) 600-612, 2004. VIFB metricsSsim.m: 11x11
    Gaussian window sigma 1.5, K = (0.01, 0.03), L = 255, 'valid' filtering, no downsampling."""
    return _ssim_sum(ir, vis, fused)


def spatial_frequency(ir: np.ndarray, vis: np.ndarray, fused: np.ndarray) -> float:
    """SF: sqrt(RF^2 + CF^2), RF^2 and CF^2 the sums of squared horizontal / vertical neighbour
    differences divided by H*W (VIFB metricsSpatial_frequency.m).

    Ref: A. M. Eskicioglu, P. S. Fisher, "Image quality measures and their performance", IEEE Trans.
    Communications 43(12) 2959-2965, 1995."""
    n = fused.size
    rf = np.sum(np.diff(fused, axis=1) ** 2) / n
    cf = np.sum(np.diff(fused, axis=0) ** 2) / n
    return float(np.sqrt(rf + cf))


def average_gradient(ir: np.ndarray, vis: np.ndarray, fused: np.ndarray) -> float:
    """AG: sum over pixels of sqrt((dx^2 + dy^2) / 2) / ((H-1)(W-1)), dx, dy from MATLAB `gradient`
    (central differences inside, one-sided at the border), as VIFB metricsAvg_gradient.m.

    Ref: G. Cui, H. Feng, Z. Xu, Q. Li, Y. Chen, "Detail preserved fusion of visible and infrared
    images using regional saliency extraction and multi-scale image decomposition", Optics
    Communications 341, 199-209, 2015."""
    dy, dx = np.gradient(fused)
    h, w = fused.shape
    return float(np.sum(np.sqrt((dx * dx + dy * dy) / 2.0)) / ((h - 1) * (w - 1)))


def edge_intensity(ir: np.ndarray, vis: np.ndarray, fused: np.ndarray) -> float:
    """EI: mean Sobel gradient magnitude of the fused image, replicate padding (VIFB
    metricsEdge_intensity.m: imfilter with fspecial('sobel') and its transpose, 'replicate').

    Ref: B. Rajalingam, R. Priya, "Hybrid multimodality medical image fusion technique for feature
    enhancement in medical diagnosis", Int. J. Engineering Science Invention, 2018."""
    k = np.array([[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]])
    gx = ndimage.correlate(fused, k, mode="nearest")
    gy = ndimage.correlate(fused, k.T, mode="nearest")
    return float(np.mean(np.sqrt(gx * gx + gy * gy)))


def _cross_entropy_vifb(src: np.ndarray, fused: np.ndarray) -> float:
    p1, p2 = _hist256(src), _hist256(fused)
    keep = (p1 > 0) & (p2 > 0)  # VIFB skips bins empty in either image
    return float(np.sum(p1[keep] * np.log2(p1[keep] / p2[keep])))


def cross_entropy(ir: np.ndarray, vis: np.ndarray, fused: np.ndarray) -> float:
    """CE: mean over the two sources of sum_k p_src(k) log2(p_src(k) / p_F(k)) over the 256 grey levels
    (bins empty in either histogram skipped), as VIFB metricsCross_entropy.m. Lower is better.

    Ref: D. M. Bulanon, T. Burks, V. Alchanatis, "Image fusion of visible and thermal images for fruit
    detection", Biosystems Engineering 103(1) 12-22, 2009."""
    return (_cross_entropy_vifb(vis, fused) + _cross_entropy_vifb(ir, fused)) / 2.0


def rmse(ir: np.ndarray, vis: np.ndarray, fused: np.ndarray) -> float:
    """RMSE: (RMSE(vis, F) + RMSE(ir, F)) / 2 on 8-bit values, RMSE(a, F) = sqrt(mean((a - F)^2)).
    Lower is better.

    Ref: P. Jagalingam, A. V. Hegde, "A review of quality metrics for fused image", Aquatic Procedia 4,
    133-142, 2015. The two-source average is VIFB's (metricsRmse.m); the per-source quantity is the
    true RMSE, not VIFB's sqrt(sum((a-F)^2)) / (H*W) (see the module docstring)."""
    return float((np.sqrt(np.mean((vis - fused) ** 2)) + np.sqrt(np.mean((ir - fused) ** 2))) / 2.0)


def psnr(ir: np.ndarray, vis: np.ndarray, fused: np.ndarray) -> float:
    """PSNR: 10 log10(255^2 / MSE) with MSE = (MSE(vis, F) + MSE(ir, F)) / 2, in dB.

    Ref: P. Jagalingam, A. V. Hegde, Aquatic Procedia 4, 133-142, 2015. Structure as VIFB
    metricsPsnr.m (peak 255, the sources' errors averaged before the log), with the true MSE (see the
    module docstring). Identical images give +inf."""
    mse = (np.mean((vis - fused) ** 2) + np.mean((ir - fused) ** 2)) / 2.0
    return float(10.0 * np.log10(255.0 ** 2 / mse)) if mse > 0 else float("inf")


def _qabf_grad(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sobel strength and orientation as VIFB's Qabf (atan(y/x), pi/2 where x == 0)."""
    gx, gy = _sobel_xy(x)  # VIFB uses conv2 (flipped kernels): both signs flip, g and atan unchanged
    g = np.sqrt(gx * gx + gy * gy)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(gx == 0, np.pi / 2, np.arctan(gy / np.where(gx == 0, 1.0, gx)))
    return g, a


def _qabf_preservation(gs, as_, gf, af):
    tg, kg, dg, ta, ka, da = 0.9994, -15.0, 0.5, 0.9879, -22.0, 0.8
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


def _normalize1(x: np.ndarray) -> np.ndarray:
    """Z. Liu's normalize1.m: stretch to 0..255 and round (an all-zero image is returned as is)."""
    hi, lo = x.max(), x.min()
    if hi == lo:
        return x.copy()  # MATLAB would divide by zero unless the image is all zeros
    return _matlab_round((x - lo) / (hi - lo) * 255.0)


@functools.lru_cache(maxsize=8)
def _qcb_kernels():
    ax = np.arange(-15, 16, dtype=np.float64)
    xx, yy = np.meshgrid(ax, ax)
    r2 = xx * xx + yy * yy
    g1 = np.exp(-r2 / (2 * 2.0 ** 2)) / (2 * np.pi * 2.0 ** 2)  # unnormalised, as gaussian2d.m
    g2 = np.exp(-r2 / (2 * 4.0 ** 2)) / (2 * np.pi * 4.0 ** 2)
    return g1, g2


def qcb(ir: np.ndarray, vis: np.ndarray, fused: np.ndarray) -> float:
    """Qcb: Chen-Blum human-perception metric: DoG contrast-sensitivity filtering in the frequency
    domain (f0 = 15.3870, f1 = 1.3456, a = 0.7622, frequencies scaled by size/30), local contrast
    G(sigma=2)/G(sigma=4) - 1 with 31x31 kernels, contrast response k C^p / (h C^q + Z) with
    p = 3, q = 2, Z = 1e-4, preservation min(C_s/C_F, C_F/C_s), saliency weights C_s^2 / sum.

    Ref: Y. Chen, R. S. Blum, "A new automated quality assessment algorithm for image fusion", Image and
    Vision Computing 27, 1421-1432, 2009. VIFB metricsQcb.m (from Z. Liu's metricChenBlum.m). Where both
    contrast responses are 0 (0/0 in MATLAB) the preservation counts as 1 and the weights as 1/2."""
    im1, im2, imf = _normalize1(vis), _normalize1(ir), _normalize1(fused)
    u, v = _freqspace(imf.shape)
    rows, cols = imf.shape
    r = np.sqrt((u * cols / 30.0) ** 2 + (v * rows / 30.0) ** 2)
    sd = np.exp(-(r / 15.3870) ** 2) - 0.7622 * np.exp(-(r / 1.3456) ** 2)
    g1, g2 = _qcb_kernels()

    def response(x):
        xf = _centered_filter(x, sd)
        with np.errstate(divide="ignore", invalid="ignore"):
            c = np.abs(signal.fftconvolve(xf, g1, mode="same") / signal.fftconvolve(xf, g2, mode="same") - 1.0)
            return c ** 3 / (c ** 2 + 1e-4)

    c1, c2, cf = response(im1), response(im2), response(imf)

    def pres(cs):
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(cs < cf, cs / cf, cf / cs)
        return np.where((cs == 0) & (cf == 0), 1.0, q)

    with np.errstate(divide="ignore", invalid="ignore"):
        den = c1 * c1 + c2 * c2
        lam1 = np.where(den > 0, c1 * c1 / den, 0.5)
    q = lam1 * pres(c1) + (1.0 - lam1) * pres(c2)
    return float(np.mean(q))


def qcv(ir: np.ndarray, vis: np.ndarray, fused: np.ndarray) -> float:
    """Qcv: Chen-Varshney metric: 16x16 regions, saliency = sum of Sobel magnitude^alpha (alpha = 5),
    distortion = mean squared difference image after Mannos-Sakrison CSF filtering (frequencies
    scaled by size/8), Q = sum(lambda_s D_s) / sum(lambda_s). Lower is better.

    Ref: H. Chen, P. K. Varshney, "A human perception inspired quality metric for image fusion based on
    regional information", Information Fusion 8(2) 193-207, 2007. VIFB metricsQcv.m (from Z. Liu's
    metricChen.m); partial border blocks are zero padded as MATLAB's blkproc does."""
    im1, im2, imf = _normalize1(vis), _normalize1(ir), _normalize1(fused)
    ws, alpha = 16, 5

    def magnitude(x):
        gx, gy = _sobel_xy(x)
        return np.sqrt(gx * gx + gy * gy)

    def blocks(x):  # (H, W) -> (nb_h, nb_w, ws*ws), zero padded to a multiple of ws (blkproc)
        h, w = x.shape
        ph, pw = -h % ws, -w % ws
        x = np.pad(x, ((0, ph), (0, pw)))
        nh, nw = x.shape[0] // ws, x.shape[1] // ws
        return x.reshape(nh, ws, nw, ws).transpose(0, 2, 1, 3).reshape(nh, nw, ws * ws)

    lam1 = np.sum(blocks(magnitude(im1)) ** alpha, axis=-1)
    lam2 = np.sum(blocks(magnitude(im2)) ** alpha, axis=-1)
    rows, cols = imf.shape
    u, v = _freqspace(imf.shape)
    r = np.sqrt((u * cols / 8.0) ** 2 + (v * rows / 8.0) ** 2)
    theta_m = 2.6 * (0.0192 + 0.144 * r) * np.exp(-((0.144 * r) ** 1.1))
    d1 = np.mean(blocks(_centered_filter(im1 - imf, theta_m)) ** 2, axis=-1)
    d2 = np.mean(blocks(_centered_filter(im2 - imf, theta_m)) ** 2, axis=-1)
    den = float(np.sum(lam1 + lam2))
    return float(np.sum(lam1 * d1 + lam2 * d2)) / den if den > 0 else float("nan")


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


# --- PC (Zhao, Laganiere, Liu; phase congruency after Kovesi)

_PC_NSCALE, _PC_NORIENT = 4, 6


@functools.lru_cache(maxsize=4)
def _pc_bank(rows: int, cols: int):
    """Log-Gabor filter bank of myphasecong3.m (nscale 4, norient 6, min wavelength 3, mult 2.1,
    sigmaOnf 0.55, dThetaOnSigma 1.2) and the image-independent noise statistics per orientation."""
    min_wl, mult, sigma_onf, d_theta_on_sigma = 3.0, 2.1, 0.55, 1.2
    theta_sigma = np.pi / _PC_NORIENT / d_theta_on_sigma

    def rng(n):
        return (np.arange(n) - (n - 1) / 2) / (n - 1) if n % 2 else (np.arange(n) - n / 2) / n

    x, y = np.meshgrid(rng(cols), rng(rows))
    radius = np.sqrt(x * x + y * y)
    radius[rows // 2, cols // 2] = 1.0
    theta = np.arctan2(-y, x)
    radius, theta = np.fft.ifftshift(radius), np.fft.ifftshift(theta)
    sin_t, cos_t = np.sin(theta), np.cos(theta)
    # lowpassfilter([rows, cols], .45, 15)
    lx = (np.arange(cols) - cols // 2) / cols
    ly = (np.arange(rows) - rows // 2) / rows
    lr = np.sqrt(lx[None, :] ** 2 + ly[:, None] ** 2)
    lp = np.fft.fftshift(1.0 / (1.0 + (lr / 0.45) ** 30))
    log_gabor = []
    for s in range(_PC_NSCALE):
        fo = 1.0 / (min_wl * mult ** s)
        lg = np.exp(-(np.log(radius / fo)) ** 2 / (2 * np.log(sigma_onf) ** 2)) * lp
        lg[0, 0] = 0.0
        log_gabor.append(lg)
    log_gabor = np.stack(log_gabor)  # (S, H, W)
    filters, noise = [], []
    for o in range(_PC_NORIENT):
        angl = o * np.pi / _PC_NORIENT
        ds = sin_t * np.cos(angl) - cos_t * np.sin(angl)
        dc = cos_t * np.cos(angl) + sin_t * np.sin(angl)
        spread = np.exp(-np.arctan2(ds, dc) ** 2 / (2 * theta_sigma ** 2))
        filt = log_gabor * spread  # (S, H, W)
        # myphasecong3 sums products of real(ifft2(filter)) * sqrt(H W) over the image; by Parseval
        # that is the sum over frequencies of the filters' even parts (F(k) + F(-k)) / 2: no FFT.
        even = 0.5 * (filt + np.roll(filt[:, ::-1, ::-1], (1, 1), axis=(1, 2)))
        sum_an2 = float(np.sum(even * even))
        csum = np.cumsum(even, axis=0)
        sum_aiaj = float(sum(np.sum(even[sj] * csum[sj - 1]) for sj in range(1, _PC_NSCALE)))
        em_n = float(np.sum(filt[0] ** 2))
        filters.append(filt.astype(np.float32))  # the image FFTs run in single precision (speed)
        noise.append((em_n, sum_an2, sum_aiaj, angl))
    return np.stack(filters), tuple(noise)  # (O, S, H, W)


def phase_congruency(im: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Kovesi's phase congruency as Z. Liu's myphasecong3.m (k = 2, cutOff 0.5, g = 10): returns
    (PC, M, m), the phase congruency and the max / min moments of its covariance. (H, W) each."""
    rows, cols = im.shape
    filters, noise = _pc_bank(rows, cols)
    eps, k, cut_off, g = 1e-4, 2.0, 0.5, 10.0
    image_fft = sfft.fft2(im.astype(np.float32))
    total_energy = np.zeros((rows, cols))
    total_sum_an = np.zeros((rows, cols))
    covx2 = np.zeros((rows, cols))
    covy2 = np.zeros((rows, cols))
    covxy = np.zeros((rows, cols))
    for o in range(_PC_NORIENT):
        em_n, sum_an2, sum_aiaj, angl = noise[o]
        eo = sfft.ifft2(image_fft[None] * filters[o], axes=(-2, -1))  # (S, H, W)
        e, od = eo.real, eo.imag
        an = np.abs(eo)
        sum_an = an.sum(0)
        sum_e, sum_o = e.sum(0), od.sum(0)
        max_an = an.max(0)
        x_energy = np.sqrt(sum_e ** 2 + sum_o ** 2) + eps
        mean_e, mean_o = sum_e / x_energy, sum_o / x_energy
        energy = np.sum(e * mean_e + od * mean_o - np.abs(e * mean_o - od * mean_e), axis=0)
        median_e2n = np.median(an[0] ** 2)
        noise_power = (-median_e2n / np.log(0.5)) / em_n
        est2 = 2 * noise_power * sum_an2 + 4 * noise_power * sum_aiaj
        tau = np.sqrt(est2 / 2)
        t = (tau * np.sqrt(np.pi / 2) + k * np.sqrt((2 - np.pi / 2) * tau ** 2)) / 1.7
        energy = np.maximum(energy - t, 0.0)
        width = sum_an / (max_an + eps) / _PC_NSCALE
        weight = 1.0 / (1.0 + np.exp((cut_off - width) * g))
        total_sum_an += sum_an
        total_energy += weight * energy
        with np.errstate(divide="ignore", invalid="ignore"):
            pc_o = np.where(sum_an > 0, weight * energy / sum_an, 0.0)
        cx, cy = pc_o * np.cos(angl), pc_o * np.sin(angl)
        covx2 += cx * cx
        covy2 += cy * cy
        covxy += cx * cy
    pc = total_energy / (total_sum_an + eps)
    covx2 /= _PC_NORIENT / 2
    covy2 /= _PC_NORIENT / 2
    covxy /= _PC_NORIENT
    denom = np.sqrt(covxy ** 2 + (covx2 - covy2) ** 2) + eps
    return pc, (covy2 + covx2 + denom) / 2, (covy2 + covx2 - denom) / 2


_PC_CACHE: "OrderedDict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray]]" = OrderedDict()


def _phase_congruency_cached(im: np.ndarray):
    """phase_congruency memoised on the image content: the sources' maps are reused when several
    fused images of the same pair are scored in one process (the result arrays are read only)."""
    key = (im.shape, hashlib.blake2b(np.ascontiguousarray(im).tobytes(), digest_size=16).digest())
    if key in _PC_CACHE:
        _PC_CACHE.move_to_end(key)
        return _PC_CACHE[key]
    out = phase_congruency(im)
    _PC_CACHE[key] = out
    while len(_PC_CACHE) > 4:
        _PC_CACHE.popitem(last=False)
    return out


def _pc_corr(f1, f2, fmax, ff, m1, m2, m3) -> float:
    c = 1e-4
    f1, f2, fmax = f1 * m1, f2 * m2, fmax * m3
    mu1, mu2, muf, mum = (_gauss_same(v, _G11) for v in (f1, f2, ff, fmax))
    s1 = _gauss_same(f1 * f1, _G11) - mu1 * mu1
    s2 = _gauss_same(f2 * f2, _G11) - mu2 * mu2
    sm = _gauss_same(fmax * fmax, _G11) - mum * mum
    sf = _gauss_same(ff * ff, _G11) - muf * muf
    s1f = _gauss_same(f1 * ff, _G11) - mu1 * muf
    s2f = _gauss_same(f2 * ff, _G11) - mu2 * muf
    smf = _gauss_same(fmax * ff, _G11) - mum * muf
    r1 = np.where(m1, (s1f + c) / (np.sqrt(np.abs(s1 * sf)) + c), 0.0)
    r2 = np.where(m2, (s2f + c) / (np.sqrt(np.abs(s2 * sf)) + c), 0.0)
    r3 = np.where(m3, (smf + c) / (np.sqrt(np.abs(sm * sf)) + c), 0.0)
    a3 = int(np.sum(m3))
    return float(np.sum(np.maximum(np.maximum(r1, r2), r3))) / a3 if a3 else float("nan")


def phase_congruency_metric(ir: np.ndarray, vis: np.ndarray, fused: np.ndarray) -> float:
    """PC: Zhao-Laganiere-Liu's phase-congruency metric: product of the local (11x11 Gaussian window)
    correlation scores of PC, max moment M and min moment m between F and the sources (and their
    per-pixel maximum), over positions where the sources' PC exceeds 0.1.

    Ref: J. Zhao, R. Laganiere, Z. Liu, "Performance assessment of combinative pixel-level image fusion
    based on an absolute feature measurement", Int. J. Innovative Computing, Information and Control
    3(6A) 1433-1447, 2007, as surveyed in Z. Liu et al., IEEE TPAMI 34(1) 94-109, 2012; Z. Liu's
    metricZhao.m with myphasecong3.m, step for step."""
    pc1, big1, small1 = _phase_congruency_cached(vis)
    pc2, big2, small2 = _phase_congruency_cached(ir)
    pcf, bigf, smallf = phase_congruency(fused)
    take1 = pc1 > pc2
    pc_max = np.where(take1, pc1, pc2)
    big_max = np.where(take1, big1, big2)
    small_max = np.where(take1, small1, small2)
    m1, m2, m3 = pc1 > 0.1, pc2 > 0.1, pc_max > 0.1
    return (_pc_corr(pc1, pc2, pc_max, pcf, m1, m2, m3)
            * _pc_corr(big1, big2, big_max, bigf, m1, m2, m3)
            * _pc_corr(small1, small2, small_max, smallf, m1, m2, m3))


# ----------------------------------------------------------------------------------- registry

# CSV name -> metric. The order is the CSV's column order: DMFuse's eight, then the rest.
METRICS: dict[str, Metric] = {
    "EN": entropy,
    "SD": standard_deviation,
    "PC": phase_congruency_metric,
    "FMI_pixel": fmi_pixel,
    "Qe": qe,
    "Qabf": qabf,
    "MS_SSIM": ms_ssim,
    "VIF": vif,
    "SSIM": structural_similarity,
    "MI": mutual_information,
    "SF": spatial_frequency,
    "AG": average_gradient,
    "PSNR": psnr,
    "RMSE": rmse,
    "CE": cross_entropy,
    "EI": edge_intensity,
    "SCD": scd,
    "CC": correlation_coefficient,
    "Qcb": qcb,
    "Qcv": qcv,
}

LOWER_IS_BETTER = frozenset({"RMSE", "CE", "Qcv"})


# ------------------------------------------------------------------------------------- colour


def _luminance_8bit(x01: np.ndarray) -> np.ndarray:
    """(H, W, C) in [0, 1] -> (H, W) 8-bit values: grey as is, colour via BT.601 Y."""
    from dmfuse_jax.data.images import rgb_to_ycbcr

    x = np.asarray(x01, np.float64)
    if x.ndim == 3 and x.shape[-1] == 3:
        x = rgb_to_ycbcr(x)[..., 0]
    return to_8bit_grey(x)


COLOR_MODES = ("luminance", "per-channel")


def evaluate_images(ir01: np.ndarray, vis01: np.ndarray, fused01: np.ndarray,
                    names: list[str] | tuple[str, ...] | None = None,
                    color: str = "luminance") -> dict[str, float]:
    """Scores one fused image against its two sources. Images: float [0, 1], (H, W), (H, W, 1) or
    (H, W, 3), all of the same H and W.

    color='luminance': every colour image is reduced to its BT.601 luminance (8-bit) first.
    color='per-channel': a colour fused image is scored per R, G, B channel and the metric averaged
    over the channels, a grey source being reused for every channel, a colour source giving its own
    channel (VIFB). A grey fused image is scored on grey sources (luminance) in both modes.
    """
    if color not in COLOR_MODES:
        raise ValueError(f"unknown colour mode {color!r} (expected one of {', '.join(COLOR_MODES)})")
    names = list(METRICS) if names is None else list(names)
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)} (known: {', '.join(METRICS)})")
    fused01 = np.asarray(fused01)
    if color == "per-channel" and fused01.ndim == 3 and fused01.shape[-1] == 3:
        def channel(x, c):
            x = np.asarray(x)
            return to_8bit_grey(x[..., c] if x.ndim == 3 and x.shape[-1] == 3 else x)

        triples = [(channel(ir01, c), channel(vis01, c), channel(fused01, c)) for c in range(3)]
    else:
        triples = [(_luminance_8bit(ir01), _luminance_8bit(vis01), _luminance_8bit(fused01))]
    return {n: float(np.mean([METRICS[n](a, b, f) for a, b, f in triples])) for n in names}
