"""PC: Zhao-Laganiere-Liu's phase-congruency fusion metric, with Kovesi's phase congruency as in
Z. Liu's myphasecong3.m. Signature: `fn(ir, vis, fused) -> float` on float64 (H, W) 8-bit grey values."""
from __future__ import annotations

import functools
import hashlib
from collections import OrderedDict

import numpy as np
from scipy import fft as sfft

from dmfuse_jax.evaluation.metrics._common import _G11, _gauss_same


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


