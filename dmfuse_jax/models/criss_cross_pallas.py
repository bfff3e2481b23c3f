"""Criss-cross attention as Pallas kernels (Triton lowering on GPU, interpret mode elsewhere).

Same contract as `criss_cross.criss_cross_reference`: q, k (B, H, W, Cq), v (B, H, W, Cv) ->
(B, H, W, Cv); per position (h, w) ONE softmax over its column (H entries, the centre h' = h masked)
and its row (W entries); no 1/sqrt(d) scaling.

How: the joint softmax over column + row splits into two ordinary attentions that share the
normaliser. A column pass (sequence axis H, one sequence per (b, w)) and a row pass (sequence axis W,
one per (b, h)) each run a flash-style online softmax over key blocks and return their normalised
output and log-sum-exp (B, H, W); a cheap elementwise merge combines them:
    lse = logaddexp(lse_col, lse_row);  out = out_col e^(lse_col - lse) + out_row e^(lse_row - lse).
Nothing of size (H + W) x H x W is ever materialised: memory is O(H W (Cv + Cq)).

Gradients (`jax.custom_vjp`): backward KERNELS, not recomputation with the reference. With the
joint lse and delta = sum(dO * O) per position, each direction's gradient is a standard flash
attention backward (P = exp(S - lse), dS = P (dP - delta)); a dQ kernel (grid over query blocks)
and a dK/dV kernel (grid over key blocks) run per direction and the two directions are summed.

Layout: the sequences are read in place through BlockSpecs (a column is a strided view of the NHWC
array), so there are no transposes. H and W are zero-padded to multiples of the block size and the
channels to powers of two >= 16 (Triton's dot needs dims >= 16); padded keys are masked by index.
Statistics (max, sum, lse, delta) and accumulators are float32 whatever the input dtype; bf16 inputs
use bf16 matmuls with float32 accumulation, float32 inputs use full-precision (IEEE, not TF32) dots.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

F32 = jnp.float32
# Finite "minus infinity" for masked energies: keeps exp(m_prev - m_next) free of inf - inf.
MASK_VALUE = -1e30
DEFAULT_BLOCK = 64


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def block_size_for(length: int, block: int = DEFAULT_BLOCK) -> int:
    """Sequence block for a length: a power of two in [16, block] (Triton: pow2 shapes, dot dims >= 16)."""
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    return min(block, max(16, _next_pow2(length)))


def _channels_padded(c: int) -> int:
    return max(16, _next_pow2(c))


def _dot(a, b, contract_a: int, contract_b: int, precision):
    """2-D matmul with float32 accumulation; contracting dims chosen so no explicit transpose."""
    return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                           precision=precision, preferred_element_type=F32)


def _precision(dtype):
    return lax.Precision.HIGHEST if dtype == jnp.float32 else lax.Precision.DEFAULT


def _valid(q_pos, k_pos, length: int, mask_diagonal: bool, mask_queries: bool = True):
    """(bq, bk) bool: key (and query) inside the real sequence, centre excluded on the column pass.

    The forward pass keeps padded queries (mask_queries=False) so their lse stays finite: the row
    pass always has a real key, and finite residuals keep NaNs out of the backward pass."""
    ok = k_pos[None, :] < length
    if mask_queries:
        ok &= q_pos[:, None] < length
    if mask_diagonal:
        ok &= q_pos[:, None] != k_pos[None, :]
    return ok


# ----------------------------------------------------------------------------------------------
# Kernels. Refs are 2-D (sequence, channels) or 1-D (sequence) views chosen by the BlockSpecs.

def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, length, block_q, block_k, mask_diagonal,
                precision):
    i = pl.program_id(2)
    q = q_ref[...]  # (bq, Cq)
    q_pos = i * block_q + jnp.arange(block_q)
    n_kv = k_ref.shape[0] // block_k

    def body(j, carry):
        acc, m_prev, l_prev = carry
        k = k_ref[pl.ds(j * block_k, block_k), :]
        v = v_ref[pl.ds(j * block_k, block_k), :]
        k_pos = j * block_k + jnp.arange(block_k)
        valid = _valid(q_pos, k_pos, length, mask_diagonal, mask_queries=False)
        s = jnp.where(valid, _dot(q, k, 1, 1, precision), MASK_VALUE)  # (bq, bk)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
        p = jnp.where(valid, jnp.exp(s - m_next[:, None]), 0.0)
        corr = jnp.exp(m_prev - m_next)
        l_next = corr * l_prev + jnp.sum(p, axis=1)
        acc = corr[:, None] * acc + _dot(p.astype(v.dtype), v, 1, 0, precision)
        return acc, m_next, l_next

    acc = jnp.zeros((block_q, v_ref.shape[1]), F32)
    m = jnp.full((block_q,), MASK_VALUE, F32)
    l = jnp.zeros((block_q,), F32)
    acc, m, l = lax.fori_loop(0, n_kv, body, (acc, m, l))
    has_any = l > 0.0  # False only for a column of height 1 (its single entry is the centre)
    o_ref[...] = acc / jnp.where(has_any, l, 1.0)[:, None]
    lse_ref[...] = jnp.where(has_any, m + jnp.log(jnp.where(has_any, l, 1.0)), -jnp.inf)


def _bwd_dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, length, block_q,
                   block_k, mask_diagonal, precision):
    i = pl.program_id(2)
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]
    q_pos = i * block_q + jnp.arange(block_q)
    n_kv = k_ref.shape[0] // block_k

    def body(j, dq):
        k = k_ref[pl.ds(j * block_k, block_k), :]
        v = v_ref[pl.ds(j * block_k, block_k), :]
        k_pos = j * block_k + jnp.arange(block_k)
        valid = _valid(q_pos, k_pos, length, mask_diagonal)
        s = _dot(q, k, 1, 1, precision)
        p = jnp.where(valid, jnp.exp(s - lse[:, None]), 0.0)
        dp = _dot(do, v, 1, 1, precision)  # (bq, bk)
        ds = p * (dp - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k, 1, 0, precision)

    dq_ref[...] = lax.fori_loop(0, n_kv, body, jnp.zeros(dq_ref.shape, F32))


def _bwd_dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, length,
                    block_q, block_k, mask_diagonal, precision):
    j = pl.program_id(2)
    k = k_ref[...]
    v = v_ref[...]
    k_pos = j * block_k + jnp.arange(block_k)
    n_q = q_ref.shape[0] // block_q

    def body(i, carry):
        dk, dv = carry
        sl = pl.ds(i * block_q, block_q)
        q = q_ref[sl, :]
        do = do_ref[sl, :]
        lse = lse_ref[sl]
        delta = delta_ref[sl]
        q_pos = i * block_q + jnp.arange(block_q)
        valid = _valid(q_pos, k_pos, length, mask_diagonal)
        s = _dot(q, k, 1, 1, precision)
        p = jnp.where(valid, jnp.exp(s - lse[:, None]), 0.0)  # (bq, bk)
        dv = dv + _dot(p.astype(do.dtype), do, 0, 0, precision)
        dp = _dot(do, v, 1, 1, precision)
        ds = p * (dp - delta[:, None])
        dk = dk + _dot(ds.astype(q.dtype), q, 0, 0, precision)
        return dk, dv

    dk, dv = lax.fori_loop(0, n_q, body, (jnp.zeros(dk_ref.shape, F32), jnp.zeros(dv_ref.shape, F32)))
    dk_ref[...] = dk
    dv_ref[...] = dv


# ----------------------------------------------------------------------------------------------
# Block specs per direction. Arrays are (B, Hp, Wp, C) and (B, Hp, Wp); grid (B, other, seq blocks).

def _specs(axis: str, block: int, seq_len: int):
    """(block spec of a (block, C) tile, of the whole (seq, C) sequence, of a (block,) and a (seq,)
    statistics slice) for axis 'col' (sequence = H, one per (b, w)) or 'row' (sequence = W)."""
    if axis == "col":
        tile = lambda c: pl.BlockSpec((None, block, None, c), lambda b, o, i: (b, i, o, 0))
        whole = lambda c: pl.BlockSpec((None, seq_len, None, c), lambda b, o, i: (b, 0, o, 0))
        stat_tile = pl.BlockSpec((None, block, None), lambda b, o, i: (b, i, o))
        stat_whole = pl.BlockSpec((None, seq_len, None), lambda b, o, i: (b, 0, o))
    else:
        tile = lambda c: pl.BlockSpec((None, None, block, c), lambda b, o, i: (b, o, i, 0))
        whole = lambda c: pl.BlockSpec((None, None, seq_len, c), lambda b, o, i: (b, o, 0, 0))
        stat_tile = pl.BlockSpec((None, None, block), lambda b, o, i: (b, o, i))
        stat_whole = pl.BlockSpec((None, None, seq_len), lambda b, o, i: (b, o, 0))
    return tile, whole, stat_tile, stat_whole


def _geometry(shape, axis: str, block: int):
    b, hp, wp = shape[:3]
    seq, other = (hp, wp) if axis == "col" else (wp, hp)
    return (b, other, seq // block), seq


def _compiler_params(interpret: bool):
    if interpret:
        return None
    from jax.experimental.pallas import triton as plgpu
    return plgpu.CompilerParams(num_warps=4, num_stages=2)


def _direction_fwd(q, k, v, *, axis, length, block, interpret):
    """One direction's normalised output (B, Hp, Wp, Cv) f32 and its lse (B, Hp, Wp) f32."""
    grid, seq = _geometry(q.shape, axis, block)
    tile, whole, stat_tile, _ = _specs(axis, block, seq)
    cq, cv = q.shape[-1], v.shape[-1]
    kernel = functools.partial(_fwd_kernel, length=length, block_q=block, block_k=block,
                               mask_diagonal=axis == "col", precision=_precision(q.dtype))
    return pl.pallas_call(
        kernel, grid=grid,
        in_specs=[tile(cq), whole(cq), whole(cv)],
        out_specs=[tile(cv), stat_tile],
        out_shape=[jax.ShapeDtypeStruct(v.shape, F32), jax.ShapeDtypeStruct(q.shape[:3], F32)],
        compiler_params=_compiler_params(interpret), interpret=interpret,
        name=f"criss_cross_fwd_{axis}",
    )(q, k, v)


def _direction_bwd(q, k, v, do, lse, delta, *, axis, length, block, interpret):
    """One direction's (dq, dk, dv), float32, given the JOINT lse and delta."""
    grid, seq = _geometry(q.shape, axis, block)
    tile, whole, stat_tile, stat_whole = _specs(axis, block, seq)
    cq, cv = q.shape[-1], v.shape[-1]
    kw = dict(length=length, block_q=block, block_k=block, mask_diagonal=axis == "col",
              precision=_precision(q.dtype))
    params = _compiler_params(interpret)
    dq = pl.pallas_call(
        functools.partial(_bwd_dq_kernel, **kw), grid=grid,
        in_specs=[tile(cq), whole(cq), whole(cv), tile(cv), stat_tile, stat_tile],
        out_specs=tile(cq), out_shape=jax.ShapeDtypeStruct(q.shape, F32),
        compiler_params=params, interpret=interpret, name=f"criss_cross_bwd_dq_{axis}",
    )(q, k, v, do, lse, delta)
    dk, dv = pl.pallas_call(
        functools.partial(_bwd_dkv_kernel, **kw), grid=grid,
        in_specs=[whole(cq), tile(cq), tile(cv), whole(cv), stat_whole, stat_whole],
        out_specs=[tile(cq), tile(cv)],
        out_shape=[jax.ShapeDtypeStruct(k.shape, F32), jax.ShapeDtypeStruct(v.shape, F32)],
        compiler_params=params, interpret=interpret, name=f"criss_cross_bwd_dkv_{axis}",
    )(q, k, v, do, lse, delta)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Padded core with its custom VJP. Static config: (H, W, block_h, block_w, interpret).

def _forward(q, k, v, cfg):
    h, w, bh, bw, interpret = cfg
    out_c, lse_c = _direction_fwd(q, k, v, axis="col", length=h, block=bh, interpret=interpret)
    out_r, lse_r = _direction_fwd(q, k, v, axis="row", length=w, block=bw, interpret=interpret)
    lse = jnp.logaddexp(lse_c, lse_r)
    out = (out_c * jnp.exp(lse_c - lse)[..., None] + out_r * jnp.exp(lse_r - lse)[..., None])
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _criss_cross_padded(q, k, v, cfg):
    out, _ = _forward(q, k, v, cfg)
    return out.astype(v.dtype)


def _padded_fwd(q, k, v, cfg):
    out, lse = _forward(q, k, v, cfg)
    return out.astype(v.dtype), (q, k, v, out, lse)


def _padded_bwd(cfg, res, d_out):
    h, w, bh, bw, interpret = cfg
    q, k, v, out, lse = res
    delta = jnp.sum(d_out.astype(F32) * out, axis=-1)  # (B, Hp, Wp)
    do = d_out.astype(v.dtype)
    dq_c, dk_c, dv_c = _direction_bwd(q, k, v, do, lse, delta, axis="col", length=h, block=bh,
                                      interpret=interpret)
    dq_r, dk_r, dv_r = _direction_bwd(q, k, v, do, lse, delta, axis="row", length=w, block=bw,
                                      interpret=interpret)
    return ((dq_c + dq_r).astype(q.dtype), (dk_c + dk_r).astype(k.dtype),
            (dv_c + dv_r).astype(v.dtype))


_criss_cross_padded.defvjp(_padded_fwd, _padded_bwd)


def criss_cross_pallas(q: jax.Array, k: jax.Array, v: jax.Array, *, block: int = DEFAULT_BLOCK,
                       interpret: bool | None = None) -> jax.Array:
    """Criss-cross attention, flash-style. q, k: (B, H, W, Cq); v: (B, H, W, Cv) -> (B, H, W, Cv).

    `block`: sequence tile (power of two >= 16; shrunk for short sequences). `interpret`: run the
    kernels in Pallas interpret mode (default: when the backend is not a GPU). Differentiable.
    """
    if q.ndim != 4 or q.shape != k.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"criss_cross_pallas: expected q, k (B, H, W, Cq) and v (B, H, W, Cv), "
                         f"got q {q.shape}, k {k.shape}, v {v.shape}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"criss_cross_pallas: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    _, h, w, cq = q.shape
    cv = v.shape[-1]
    bh, bw = block_size_for(h, block), block_size_for(w, block)
    hp, wp = -(-h // bh) * bh, -(-w // bw) * bw
    cqp, cvp = _channels_padded(cq), _channels_padded(cv)

    def pad(x, c):
        return jnp.pad(x, ((0, 0), (0, hp - h), (0, wp - w), (0, c - x.shape[-1])))

    out = _criss_cross_padded(pad(q, cqp), pad(k, cqp), pad(v, cvp), (h, w, bh, bw, bool(interpret)))
    return out[:, :h, :w, :cv]
