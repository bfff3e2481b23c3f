"""Criss-cross attention (CCNet-style, the core of CAIM): the portable jnp reference and the dispatcher.

For each position (h, w) one softmax runs over the H + W entries of its column and row (the column
entry at h' = h is masked so the centre is counted once); the output is the attention-weighted sum
of the values along that path. No 1/sqrt(d) scaling (as the authors' code).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import logging

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)


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


@functools.lru_cache(maxsize=None)
def _pallas_available() -> bool:
    """Whether the kernel lowers on this GPU: its Triton lowering is deprecated in jax 0.11 and may
    be missing in a later jax or jaxlib build. Probed once per process by compiling (not running)
    a tiny forward and backward; any failure means 'auto' uses the reference, with one warning."""
    try:
        from jax.experimental.pallas import triton  # noqa: F401

        from dmfuse_jax.models.criss_cross_pallas import criss_cross_pallas

        x = jax.ShapeDtypeStruct((1, 16, 16, 16), jnp.float32)
        loss = lambda q: jnp.sum(criss_cross_pallas(q, q, q, interpret=False))
        jax.jit(jax.grad(loss)).lower(x).compile()
    except Exception as e:  # noqa: BLE001 - ImportError, lowering or compile errors alike
        log.warning("criss-cross Pallas kernel unavailable on this GPU (%s: %s); using the jnp reference",
                    type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
        return False
    return True


def batch_axes_of(mesh, batch: int) -> tuple[str, ...]:
    """The axes of `mesh` (the context mesh) that split a batch of `batch` examples: the mesh axes of
    the logical 'batch' axis (training.sharding.RULES) of size > 1, not already manual (inside a
    shard_map). () when they do not divide `batch` (the caller then runs unsharded)."""
    from dmfuse_jax.training.sharding import RULES

    names = RULES["batch"] if isinstance(RULES["batch"], tuple) else (RULES["batch"],)
    if mesh.empty:
        return ()
    manual = set(getattr(mesh, "manual_axes", ()))
    axes = tuple(a for a in names if a in mesh.axis_names and a not in manual and mesh.shape[a] > 1)
    n = 1
    for a in axes:
        n *= mesh.shape[a]
    return axes if axes and batch % n == 0 else ()


def batch_parallel(fn, *arrays: jax.Array) -> jax.Array:
    """fn(*arrays) run per batch shard (`jax.shard_map` over the batch axes of the context mesh,
    `jax.set_mesh`): for opaque kernels (Pallas) that the partitioner would otherwise replicate,
    computing the global batch on every device. Every array and the result are (B, ...) and fn
    must be independent per example. Its VJP is sharded the same way (shard_map transposes to a
    shard_map). Without a context mesh, or when the batch does not split, fn runs as is."""
    mesh = jax.sharding.get_abstract_mesh()
    axes = batch_axes_of(mesh, arrays[0].shape[0])
    if not axes:
        return fn(*arrays)
    spec = P(axes)
    # check_vma off: pallas_call has no varying-manual-axes rule; every operand is batch-sharded.
    return jax.shard_map(fn, in_specs=(spec,) * len(arrays), out_specs=spec, check_vma=False)(*arrays)


# Set while tracing for a GPU from a machine without one (`dmfuse compile --topology cuda`): 'auto'
# and 'pallas' then take the kernel's Triton path, as they would on the GPU.
_LOWERING_FOR_GPU = contextvars.ContextVar("dmfuse_lowering_for_gpu", default=False)


@contextlib.contextmanager
def lowering_for_gpu():
    """Within: trace the criss-cross attention as on a GPU (the Triton kernel, not interpret mode)."""
    token = _LOWERING_FOR_GPU.set(True)
    try:
        yield
    finally:
        _LOWERING_FOR_GPU.reset(token)


def criss_cross_attention(q: jax.Array, k: jax.Array, v: jax.Array, impl: str = "auto") -> jax.Array:
    """Dispatch: 'reference' (jnp), 'pallas' (GPU kernel; interpret mode off-GPU), or 'auto'
    (the kernel on GPU when it is available, the reference elsewhere). Shapes as the reference.
    The kernel runs per batch shard under a context mesh (`batch_parallel`); the reference is
    plain jnp, which the partitioner shards itself. Under `lowering_for_gpu()` 'auto' and 'pallas'
    trace the GPU kernel whatever the host backend."""
    for_gpu = _LOWERING_FOR_GPU.get()
    if impl == "auto":
        impl = "pallas" if for_gpu or (jax.default_backend() == "gpu" and _pallas_available()) else "reference"
    if impl == "reference":
        return criss_cross_reference(q, k, v)
    if impl == "pallas":
        from dmfuse_jax.models import criss_cross_pallas as ccp
        if for_gpu:  # the Triton path, whatever this host's backend
            return batch_parallel(lambda q, k, v: ccp.criss_cross_pallas(q, k, v, interpret=False), q, k, v)
        return batch_parallel(lambda q, k, v: ccp.criss_cross_pallas(q, k, v), q, k, v)
    raise ValueError(f"unknown criss-cross attention impl {impl!r} (expected auto, reference or pallas)")
