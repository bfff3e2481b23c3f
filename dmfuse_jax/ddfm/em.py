"""DDFM's EM step (MMIF-DDFM `guided_diffusion/EM_onestep.py`), pure JAX, per pair.

The hierarchical Bayesian model of `I - V = (f - V) + noise` with a total-variation prior:
`em_initial` is EM_Initial, `em_onestep` one EM_onestep call (e-step; m-step = one TV proximal
step solved with FFT through the psf2otf of the [1, -1] kernels, then the closed-form X update).
Arrays are (B, H, W) (one grey image per pair); tau_a, tau_b are (B,): each pair keeps its own
(the authors' code averages over the whole tensor, i.e. assumes batch 1).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# The authors' run (MMIF-DDFM sample.py: EM_onestep(..., lamb=0.5, rho=0.001)): the one EM default.
LAMB, RHO = 0.5, 0.001


class EMState(NamedTuple):
    C: jax.Array  # (B, H, W)
    D: jax.Array
    F1: jax.Array
    F2: jax.Array
    H: jax.Array
    tau_a: jax.Array  # (B,)
    tau_b: jax.Array


def psf2otf(psf: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """MATLAB's psf2otf: zero-pad the kernel to `shape`, circularly shift its centre to (0, 0), FFT."""
    psf = np.asarray(psf, np.float64)
    pad = np.zeros(shape, np.float64)
    pad[: psf.shape[0], : psf.shape[1]] = psf
    for axis, size in enumerate(psf.shape):
        pad = np.roll(pad, -int(size / 2), axis=axis)
    return np.fft.fft2(pad)


def otfs(shape: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
    """psf2otf of [[1, -1]] and [[1], [-1]] at (H, W), complex64 (the authors' tensors)."""
    return (jnp.asarray(psf2otf(np.array([[1, -1]]), shape), jnp.complex64),
            jnp.asarray(psf2otf(np.array([[1], [-1]]), shape), jnp.complex64))


def em_initial(I: jax.Array) -> EMState:
    """EM_Initial: C = D = 1, F1 = F2 = H = 0, tau_a = tau_b = 1. I: (B, H, W)."""
    one, zero = jnp.ones_like(I), jnp.zeros_like(I)
    b = jnp.ones(I.shape[:1], I.dtype)
    return EMState(one, one, zero, zero, zero, b, b)


def prox_tv(X, F1, F2, fft_k1, fft_k2):
    k1sq = jnp.conj(fft_k1) * fft_k1
    k2sq = jnp.conj(fft_k2) * fft_k2
    Hf = jnp.fft.fft2(X) + jnp.conj(fft_k1) * jnp.fft.fft2(F1) + jnp.conj(fft_k2) * jnp.fft.fft2(F2)
    return jnp.real(jnp.fft.ifft2(Hf / (1 + k1sq + k2sq)))


def _forward_diff(H, axis):
    """a[i] = H[i] - H[i+1], a[-1] = H[-1] along `axis` (the authors' a1/a2)."""
    nxt = jnp.roll(H, -1, axis=axis)
    last = jnp.arange(H.shape[axis]) == H.shape[axis] - 1
    last = last.reshape([-1 if a == axis % H.ndim else 1 for a in range(H.ndim)])
    return jnp.where(last, H, H - nxt)


def em_onestep(f_pre, I, V, state: EMState, lamb: float = LAMB, rho: float = RHO):
    """EM_onestep -> (F, new state). f_pre, I, V: (B, H, W) float32."""
    fft_k1, fft_k2 = otfs(I.shape[-2:])
    col = lambda t: t[:, None, None]  # noqa: E731  (B,) -> (B, 1, 1)
    Y = I - V
    X = f_pre - V
    # e-step
    D = jnp.sqrt(2 / col(state.tau_b) / (X ** 2 + 1e-6))
    C = jnp.sqrt(2 / col(state.tau_a) / ((Y - X + 1e-6) ** 2))
    D = jnp.where(D > 2 * C, 2 * C, D)
    tau_b = jnp.mean(1.0 / (D + 1e-10) + col(state.tau_b) / 2, axis=(1, 2))
    tau_a = jnp.mean(1.0 / (C + 1e-10) + col(state.tau_a) / 2, axis=(1, 2))
    # m-step (one iteration, as the authors' `for s in range(1)`)
    H = prox_tv(Y - X, state.F1, state.F2, fft_k1, fft_k2)
    k = rho / (2 * lamb + rho)
    F1 = k * _forward_diff(H, -1)
    F2 = k * _forward_diff(H, -2)
    X = (2 * C * Y + rho * (Y - H)) / (2 * C + 2 * D + rho)
    return I - X, EMState(C, D, F1, F2, H, tau_a, tau_b)
