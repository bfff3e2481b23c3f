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

    Materialises the column energies (B, W, H, H) and the row energies (B, H, W, W), float32. The
    joint softmax shares one max and one sum between the two parts instead of concatenating them
    (2.8x faster on CPU at 144x192, no (B, H, W, H + W) copy); the column part is computed in a
    (B, W, H, .) layout so both parts are plain leading-batch matmuls.
    """
    f32 = jnp.float32
    h = q.shape[1]
    qt, kt, vt = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # (B, W, H, C)
    e_col = jnp.einsum("bwhc,bwgc->bwhg", qt, kt, preferred_element_type=f32)  # (B, W, H, H)
    e_col = jnp.where(jnp.eye(h, dtype=bool), -jnp.inf, e_col)  # the centre is counted in the row
    e_row = jnp.einsum("bhwc,bhvc->bhwv", q, k, preferred_element_type=f32)  # (B, H, W, W)
    # Softmax is shift-invariant: the shared max needs no gradient.
    m = jax.lax.stop_gradient(jnp.maximum(jnp.swapaxes(jnp.max(e_col, -1), 1, 2), jnp.max(e_row, -1)))
    p_col = jnp.exp(e_col - jnp.swapaxes(m, 1, 2)[..., None])
    p_row = jnp.exp(e_row - m[..., None])
    total = jnp.swapaxes(jnp.sum(p_col, -1), 1, 2) + jnp.sum(p_row, -1)  # (B, H, W)
    out_col = jnp.einsum("bwhg,bwgc->bwhc", p_col.astype(v.dtype), vt, preferred_element_type=f32)
    out_row = jnp.einsum("bhwv,bhvc->bhwc", p_row.astype(v.dtype), v, preferred_element_type=f32)
    return ((jnp.swapaxes(out_col, 1, 2) + out_row) / total[..., None]).astype(v.dtype)


def criss_cross_attention(q: jax.Array, k: jax.Array, v: jax.Array, impl: str = "auto") -> jax.Array:
    """Dispatch: 'reference' (jnp), 'pallas' (GPU kernel; interpret mode off-GPU), or 'auto'
    (the kernel on GPU, the reference elsewhere). Shapes as the reference."""
    if impl == "auto":
        impl = "pallas" if jax.default_backend() == "gpu" else "reference"
    if impl == "reference":
        return criss_cross_reference(q, k, v)
    if impl == "pallas":
        from dmfuse_jax.models.criss_cross_pallas import criss_cross_pallas
        return criss_cross_pallas(q, k, v)
    raise ValueError(f"unknown criss-cross attention impl {impl!r} (expected auto, reference or pallas)")
