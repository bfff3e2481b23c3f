"""Criss-cross attention (CCNet-style, the core of CAIM): the portable jnp reference and the dispatcher.

For each position (h, w) one softmax runs over the H + W entries of its column and row (the column
entry at h' = h is masked so the centre is counted once); the output is the attention-weighted sum
of the values along that path. No 1/sqrt(d) scaling (as the authors' code).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def criss_cross_reference(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """q, k: (B, H, W, Cq); v: (B, H, W, Cv) -> (B, H, W, Cv).

    Materialises the (B, H, W, H + W) energies; the softmax runs in float32.
    """
    h = q.shape[1]
    f32 = jnp.float32
    e_col = jnp.einsum("bhwc,bgwc->bhwg", q, k, preferred_element_type=f32)  # (B, H, W, H)
    e_col = jnp.where(jnp.eye(h, dtype=bool)[None, :, None, :], -jnp.inf, e_col)
    e_row = jnp.einsum("bhwc,bhvc->bhwv", q, k, preferred_element_type=f32)  # (B, H, W, W)
    a = jax.nn.softmax(jnp.concatenate([e_col, e_row], axis=-1), axis=-1)
    a_col, a_row = a[..., :h].astype(v.dtype), a[..., h:].astype(v.dtype)
    out = (jnp.einsum("bhwg,bgwc->bhwc", a_col, v, preferred_element_type=f32)
           + jnp.einsum("bhwv,bhvc->bhwc", a_row, v, preferred_element_type=f32))
    return out.astype(v.dtype)


def _pallas_available() -> bool:
    try:
        from dmfuse_jax.models import criss_cross_pallas  # noqa: F401
    except ImportError:
        return False
    return True


def criss_cross_attention(q: jax.Array, k: jax.Array, v: jax.Array, impl: str = "auto") -> jax.Array:
    """Dispatch: 'reference' (jnp), 'pallas' (GPU kernel; interpret mode off-GPU), or 'auto'
    (the kernel on GPU when it is available, the reference elsewhere). Shapes as the reference."""
    if impl == "auto":
        impl = "pallas" if jax.default_backend() == "gpu" and _pallas_available() else "reference"
    if impl == "reference":
        return criss_cross_reference(q, k, v)
    if impl == "pallas":
        from dmfuse_jax.models.criss_cross_pallas import criss_cross_pallas
        return criss_cross_pallas(q, k, v)
    raise ValueError(f"unknown criss-cross attention impl {impl!r} (expected auto, reference or pallas)")
