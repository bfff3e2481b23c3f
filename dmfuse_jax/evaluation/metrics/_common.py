"""Helpers shared by the metric families: MATLAB-equivalent filters, histograms, SSIM statistics."""
from __future__ import annotations

import math

import numpy as np
from scipy import fft as sfft
from scipy import ndimage


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

