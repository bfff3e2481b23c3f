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


# 'auto' off GPU runs the dense reference while its energies (B, H, W, H + W) float32 take at most
# this many bytes, the blockwise one above. In the whole fuse at 256x256 (2 x 256 MiB of energies)
# the dense one was faster (4.4 against 4.6 to 5.2 s per pair, same run, load 6 to 8), at 576x768
# the blockwise one (the whole fuse 16.7 against 31.1 s; the full-resolution CAIM alone 6.6 against
# 23.5 s, temporaries 236 against 6,564 MiB). Memory stays linear: at most this much is dense.
DENSE_MAX_BYTES = 1 << 29
# Blockwise: each lax.scan step holds about this many bytes of energies (rows or columns per step
# are chosen from it; at least one row or column). 1 to 16 MiB ran alike on CPU; 64 MiB 1.5x slower.
BLOCK_BYTES = 1 << 22


def dense_energy_bytes(shape) -> int:
    """Bytes of the float32 energies (B, H, W, H + W) the dense reference materialises; shape (B, H, W, .)."""
    b, h, w = shape[:3]
    return 4 * b * h * w * (h + w)


def _lines_per_block(n_lines: int, bytes_per_line: int, block_bytes: int) -> int:
    """Rows (or columns) per lax.map step: as many as fit in `block_bytes`, spread evenly over
    the steps (so the last one is not mostly padding)."""
    per = max(1, min(n_lines, block_bytes // max(bytes_per_line, 1)))
    n_blocks = -(-n_lines // per)
    return -(-n_lines // n_blocks)


def _part(q, k, v, axis: int, block_bytes: int):
    """One direction of the criss-cross path, as softmax statistics, a block of lines at a time.

    q, k: (B, H, W, Cq); v: (B, H, W, Cv). axis 1: the lines are the rows (each query attends to
    the W keys of its row); axis 2: the columns (the H keys of its column, the centre masked).
    Returns m (B, H, W) the max energy (-inf where every key is masked), s (B, H, W) =
    sum exp(e - m) and acc (B, H, W, Cv) = sum exp(e - m) v, float32. Blocks of lines are sliced
    out of q, k, v in place (no transposed copies) and their statistics written into the outputs
    under `lax.scan` (the last block is shifted back to end at the last line: it recomputes a few
    lines instead of padding). Live energies: one block, (B, lines, N, N); the block body is
    rematerialised in the backward pass, so gradients hold no (B, H, W, N) energies either.
    """
    f32 = jnp.float32
    b, n_lines, n = q.shape[0], q.shape[axis], q.shape[3 - axis]
    per = _lines_per_block(n_lines, 4 * b * n * n, block_bytes)
    n_blocks = -(-n_lines // per)
    # einsum subscripts: l = line (of the block), n / m = query / key position along the line
    lines = "blnc" if axis == 1 else "bnlc"
    stat = "bln" if axis == 1 else "bnl"

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def block(qi, ki, vi):
        e = jnp.einsum(f"{lines},{lines.replace('n', 'm')}->blnm", qi, ki, preferred_element_type=f32)
        if axis == 2:  # the column part: the centre is counted in the row part
            e = jnp.where(jnp.eye(n, dtype=bool), -jnp.inf, e)
        # Softmax is shift-invariant: the max needs no gradient. A column of one position has every
        # key masked: shift by 0 there (exp(-inf) = 0, so s = acc = 0 and the join ignores it).
        m = jax.lax.stop_gradient(jnp.max(e, -1))
        p = jnp.exp(e - jnp.where(jnp.isfinite(m), m, 0.0)[..., None])
        acc = jnp.einsum(f"blnm,{lines.replace('n', 'm')}->{lines}", p.astype(vi.dtype), vi,
                         preferred_element_type=f32)
        return (jnp.einsum(f"bln->{stat}", m), jnp.einsum(f"bln->{stat}", jnp.sum(p, -1)), acc)

    if n_blocks == 1:
        return block(q, k, v)

    def step(outs, i):
        start = jnp.minimum(i * per, n_lines - per)
        take = lambda x: jax.lax.dynamic_slice_in_dim(x, start, per, axis)
        new = block(take(q), take(k), take(v))
        return tuple(jax.lax.dynamic_update_slice_in_dim(o, x, start, axis) for o, x in zip(outs, new)), None

    init = (jnp.zeros(q.shape[:3], f32), jnp.zeros(q.shape[:3], f32), jnp.zeros(v.shape, f32))
    outs, _ = jax.lax.scan(step, init, jnp.arange(n_blocks))
    return outs


def criss_cross_blockwise(q: jax.Array, k: jax.Array, v: jax.Array, block_bytes: int = BLOCK_BYTES) -> jax.Array:
    """The reference's maths without its (B, H, W, H + W) energies: q, k (B, H, W, Cq); v (B, H, W, Cv)
    -> (B, H, W, Cv).

    The row part runs over blocks of rows, the column part (centre masked: the centre is counted
    in the row) over blocks of columns, each under `lax.scan` with at most about `block_bytes` of
    energies live; each part returns its softmax statistics (max, sum, weighted values) and the
    two are joined as in an online (flash-style) softmax. Memory is linear in H W (plus one
    block), in the backward pass too (block bodies are rematerialised).
    """
    m_c, s_c, acc_c = _part(q, k, v, 2, block_bytes)
    m_r, s_r, acc_r = _part(q, k, v, 1, block_bytes)
    m = jnp.maximum(m_r, m_c)  # finite: every row has its centre
    a_r = jnp.exp(m_r - m)
    a_c = jnp.exp(jnp.where(jnp.isfinite(m_c), m_c, 0.0) - m) * jnp.isfinite(m_c)
    total = s_r * a_r + s_c * a_c
    out = (acc_r * a_r[..., None] + acc_c * a_c[..., None]) / total[..., None]
    return out.astype(v.dtype)


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
    the logical 'batch' axis (sharding.RULES) of size > 1, not already manual (inside a
    shard_map). () when they do not divide `batch` (the caller then runs unsharded)."""
    from dmfuse_jax.sharding import RULES

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
    """Dispatch: 'reference' (dense jnp), 'blockwise' (jnp, linear memory), 'pallas' (GPU kernel;
    interpret mode off-GPU), or 'auto': the kernel on GPU when it is available; elsewhere the dense
    reference while its energies take at most DENSE_MAX_BYTES, the blockwise one above. Shapes as the reference.
    The kernel runs per batch shard under a context mesh (`batch_parallel`); the reference is
    plain jnp, which the partitioner shards itself. Under `lowering_for_gpu()` 'auto' and 'pallas'
    trace the GPU kernel whatever the host backend."""
    for_gpu = _LOWERING_FOR_GPU.get()
    if impl == "auto":
        if for_gpu or (jax.default_backend() == "gpu" and _pallas_available()):
            impl = "pallas"
        else:
            # symbolic sizes (a jax.export artefact) cannot be compared: the reference
            known = all(isinstance(d, int) for d in q.shape[:3])
            impl = "blockwise" if known and dense_energy_bytes(q.shape) > DENSE_MAX_BYTES else "reference"
    if impl == "reference":
        return criss_cross_reference(q, k, v)
    if impl == "blockwise":
        return criss_cross_blockwise(q, k, v)
    if impl == "pallas":
        from dmfuse_jax.models import criss_cross_pallas as ccp
        if for_gpu:  # the Triton path, whatever this host's backend
            return batch_parallel(lambda q, k, v: ccp.criss_cross_pallas(q, k, v, interpret=False), q, k, v)
        return batch_parallel(lambda q, k, v: ccp.criss_cross_pallas(q, k, v), q, k, v)
    raise ValueError(f"unknown criss-cross attention impl {impl!r} (expected auto, reference, blockwise or pallas)")
