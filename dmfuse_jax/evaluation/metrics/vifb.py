"""The VIFB toolbox's information and structure metrics: EN, SD, MI, SSIM, SF, AG, EI, CE, RMSE,
PSNR, Qcb, Qcv (X. Zhang, P. Ye, G. Xiao, "VIFB: A Visible and Infrared Image Fusion Benchmark", CVPR
Workshops 2020, github.com/xingchenzhang/VIFB, `metrics/metrics*.m`), each step for step as the MATLAB
code, plus the textbook variants the 'standard' convention uses where VIFB departs from the textbook
(PSNR/RMSE, SSIM, MI; see `dmfuse_jax.evaluation.metrics.CONVENTIONS`).

Signature of every metric: `fn(ir, vis, fused) -> float` on float64 (H, W) 8-bit grey values."""
from __future__ import annotations

import functools

import numpy as np
from scipy import ndimage, signal

from dmfuse_jax.evaluation.metrics._common import (
    _centered_filter, _freqspace, _hist256, _matlab_round, _sobel_xy, _ssim_sum)


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


def spatial_frequency_side_by_side(fused_channels: list[np.ndarray]) -> float:
    """SF of a colour fused image as VIFB computes it: metricsSpatial_frequency.m takes
    [m, n] = size(F) of the H x W x 3 array (so n = 3W) and indexes F(i, j), which MATLAB reads as the
    H x 3W array of the R, G and B planes side by side; the differences across the two seams count.
    fused_channels: the 8-bit (H, W) planes in order."""
    return spatial_frequency(None, None, np.concatenate(fused_channels, axis=1))


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


def _vifb_mse(a: np.ndarray, f: np.ndarray) -> float:
    """VIFB's helper `mse`: sqrt(sum((a - F)^2)) / (H*W). Not a mean squared error (it is the root of the
    summed squares over the pixel count, so it shrinks as the image grows); VIFB's PSNR and RMSE use it."""
    return float(np.sqrt(np.sum((a - f) ** 2)) / a.size)


def rmse_vifb(ir: np.ndarray, vis: np.ndarray, fused: np.ndarray) -> float:
    """RMSE as VIFB metricsRmse.m: (mse(vis, F) + mse(ir, F)) / 2 with VIFB's helper
    mse(a, F) = sqrt(sum((a - F)^2)) / (H*W) (see `_vifb_mse`). Lower is better.

    Ref: P. Jagalingam, A. V. Hegde, "A review of quality metrics for fused image", Aquatic Procedia 4,
    133-142, 2015, as implemented by VIFB."""
    return (_vifb_mse(vis, fused) + _vifb_mse(ir, fused)) / 2.0


def psnr_vifb(ir: np.ndarray, vis: np.ndarray, fused: np.ndarray) -> float:
    """PSNR as VIFB metricsPsnr.m: 20 log10(255 / sqrt(M)), M = (mse(vis, F) + mse(ir, F)) / 2 with
    VIFB's helper mse (see `_vifb_mse`), which is why VIFB's PSNRs sit near 57-60 dB. Identical images
    give +inf.

    Ref: P. Jagalingam, A. V. Hegde, Aquatic Procedia 4, 133-142, 2015, as implemented by VIFB."""
    m = (_vifb_mse(vis, fused) + _vifb_mse(ir, fused)) / 2.0
    return float(20.0 * np.log10(255.0 / np.sqrt(m))) if m > 0 else float("inf")


def rmse(ir: np.ndarray, vis: np.ndarray, fused: np.ndarray) -> float:
    """RMSE (textbook): (RMSE(vis, F) + RMSE(ir, F)) / 2 on 8-bit values, RMSE(a, F) =
    sqrt(mean((a - F)^2)). Lower is better.

    Ref: P. Jagalingam, A. V. Hegde, Aquatic Procedia 4, 133-142, 2015; the two-source average as VIFB."""
    return float((np.sqrt(np.mean((vis - fused) ** 2)) + np.sqrt(np.mean((ir - fused) ** 2))) / 2.0)


def psnr(ir: np.ndarray, vis: np.ndarray, fused: np.ndarray) -> float:
    """PSNR (textbook): 10 log10(255^2 / MSE) with MSE = (MSE(vis, F) + MSE(ir, F)) / 2, in dB.

    Ref: P. Jagalingam, A. V. Hegde, Aquatic Procedia 4, 133-142, 2015 (peak 255, the sources' errors
    averaged before the log, as VIFB). Identical images give +inf."""
    mse = (np.mean((vis - fused) ** 2) + np.mean((ir - fused) ** 2)) / 2.0
    return float(10.0 * np.log10(255.0 ** 2 / mse)) if mse > 0 else float("inf")


def structural_similarity_mean(ir: np.ndarray, vis: np.ndarray, fused: np.ndarray) -> float:
    """SSIM (textbook range): (SSIM(vis, F) + SSIM(ir, F)) / 2, so at most 1 like SSIM itself; same
    SSIM as `structural_similarity` (which sums, as VIFB).

    Ref: Z. Wang, A. C. Bovik, H. R. Sheikh, E. P. Simoncelli, IEEE TIP 13(4) 600-612, 2004."""
    return _ssim_sum(ir, vis, fused) / 2.0


def _mi_bits(a: np.ndarray, b: np.ndarray) -> float:
    """Mutual information in bits of two 8-bit images from their 256x256 joint grey-level histogram
    (no stretching: the images' own grey levels, bins on floor values)."""
    ia = np.clip(np.floor(a), 0, 255).astype(np.int64).ravel()
    ib = np.clip(np.floor(b), 0, 255).astype(np.int64).ravel()
    joint = np.bincount(ia * 256 + ib, minlength=256 * 256).astype(np.float64).reshape(256, 256)
    joint /= joint.sum()
    pa, pb = joint.sum(1), joint.sum(0)
    nz = joint > 0
    return float(np.sum(joint[nz] * np.log2(joint[nz] / np.outer(pa, pb)[nz])))


def mutual_information_bits(ir: np.ndarray, vis: np.ndarray, fused: np.ndarray) -> float:
    """MI (textbook): MI(vis, F) + MI(ir, F) in bits on the images' own 8-bit grey levels, the SUM over
    the sources as Qu et al. define the fusion MI (VIFB's `mutual_information` stretches each image to
    0..255 first and uses nats).

    Ref: G. Qu, D. Zhang, P. Yan, "Information measure for performance of image fusion", Electronics
    Letters 38(7) 313-315, 2002."""
    return _mi_bits(vis, fused) + _mi_bits(ir, fused)


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


