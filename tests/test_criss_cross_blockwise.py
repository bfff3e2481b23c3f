"""The blockwise criss-cross reference (linear memory) against the dense reference: values and
gradients, the centre mask, no (B, H, W, H + W) or (B, W, H, H) energies in the forward or the
backward, the dispatcher's choice off GPU, and CAIM with it against the authors' golden vectors."""
from __future__ import annotations

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from dmfuse_jax.models import criss_cross as cc
from dmfuse_jax.models.criss_cross import criss_cross_blockwise, criss_cross_reference


from helpers import caim_inputs as _inputs, golden_caim_params


def _out_and_grads(fn, q, k, v, ct):
    def run(q, k, v, ct):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(ct)
    return jax.jit(run)(q, k, v, ct)


# (B, H, W), block bytes: one block; one line per block (every line its own lax.map step, a
# height-1 map whose column part is all masked, a width-1 map); a few lines per block with a padded
# last block (19 rows in blocks of 2: 10 steps, one padded line).
CASES = [((2, 7, 13), 1 << 22), ((2, 7, 13), 1), ((1, 1, 5), 1), ((2, 5, 1), 1), ((1, 19, 35), 4 * 35 * 35 * 2)]


@pytest.mark.parametrize("shape,block_bytes", CASES, ids=lambda c: "x".join(map(str, c)) if isinstance(c, tuple) else f"{c}B")
def test_blockwise_matches_dense_reference_values_and_gradients(shape, block_bytes):
    q, k, v, ct = _inputs(shape)
    out, grads = _out_and_grads(functools.partial(criss_cross_blockwise, block_bytes=block_bytes), q, k, v, ct)
    ref, ref_grads = _out_and_grads(criss_cross_reference, q, k, v, ct)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0, err_msg="forward")
    for name, g, r in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=1e-5, rtol=0, err_msg=f"d{name}")


def test_blockwise_counts_the_centre_once():
    """Values one-hot per position, so out[h, w] is the attention row itself: it must be the softmax
    over the H + W - 1 distinct positions of the criss-cross path (the centre once), by hand."""
    b, h, w = 1, 4, 3
    q, k, _, _ = _inputs((b, h, w))
    v = jnp.eye(h * w).reshape(b, h, w, h * w)
    out = np.asarray(criss_cross_blockwise(q, k, v, block_bytes=1)).reshape(h * w, h * w)
    qn, kn = np.asarray(q).reshape(h * w, -1), np.asarray(k).reshape(h * w, -1)
    for i in range(h * w):
        path = [j for j in range(h * w) if j // w == i // w or j % w == i % w]  # centre listed once
        e = np.exp(kn[path] @ qn[i])
        expected = np.zeros(h * w)
        expected[path] = e / e.sum()
        np.testing.assert_allclose(out[i], expected, atol=1e-6, err_msg=f"position {divmod(i, w)}")


def _largest_intermediate(jaxpr) -> int:
    """Elements of the largest array any equation of `jaxpr` (sub-jaxprs included) produces."""
    biggest = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            biggest = max(biggest, int(np.prod(getattr(var.aval, "shape", ()) or (1,))))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            biggest = max(biggest, _largest_intermediate(sub))
    return biggest


def test_blockwise_never_materialises_the_energies_forward_or_backward():
    """At 1 x 48 x 64 the dense energies are 48 * 64 * 112 = 344,064 values; blockwise, with blocks
    of about 8 lines, nothing in the forward or the gradient program reaches a third of that."""
    q, k, v, ct = _inputs((1, 48, 64), cv=8)
    block = 4 * 8 * 64 * 64

    def loss(q, k, v):
        return jnp.sum(criss_cross_blockwise(q, k, v, block_bytes=block) * ct[..., :8])

    dense = 48 * 64 * (48 + 64)
    assert _largest_intermediate(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v).jaxpr) < dense // 3
    # the check can fail: the dense reference's gradient has its energies
    dense_loss = lambda q, k, v: jnp.sum(criss_cross_reference(q, k, v) * ct[..., :8])
    assert _largest_intermediate(jax.make_jaxpr(jax.grad(dense_loss, argnums=(0, 1, 2)))(q, k, v).jaxpr) >= 48 * 64 * 64


def test_auto_off_gpu_is_dense_for_small_maps_and_blockwise_above(monkeypatch):
    if jax.default_backend() == "gpu":
        pytest.skip("on GPU 'auto' is the Pallas kernel (tests/test_criss_cross_pallas.py)")
    q, k, v, _ = _inputs((1, 6, 5), cv=8)
    calls = []
    real = cc.criss_cross_blockwise
    monkeypatch.setattr(cc, "criss_cross_blockwise", lambda *a: calls.append(a[0].shape) or real(*a))
    np.testing.assert_array_equal(cc.criss_cross_attention(q, k, v, "auto"), criss_cross_reference(q, k, v))
    assert calls == [], "a map under DENSE_MAX_BYTES went blockwise"
    monkeypatch.setattr(cc, "DENSE_MAX_BYTES", cc.dense_energy_bytes(q.shape) - 1)
    out = cc.criss_cross_attention(q, k, v, "auto")
    assert calls == [q.shape], "a map over DENSE_MAX_BYTES did not go blockwise"
    np.testing.assert_allclose(out, criss_cross_reference(q, k, v), atol=1e-6)
    np.testing.assert_allclose(cc.criss_cross_attention(q, k, v, "blockwise"), out, atol=0)


def test_caim_blockwise_matches_authors_golden_vectors(monkeypatch):
    """The released CAIM weights with gamma = 1, blockwise with one line per block."""
    from dmfuse_jax.models.fusion_head import CAIM

    params, golden = golden_caim_params()
    monkeypatch.setattr(cc, "BLOCK_BYTES", 1)
    with jax.default_matmul_precision("float32"):
        out_x, out_y = jax.jit(lambda p, x, y: CAIM(impl="blockwise").apply({"params": p}, x, y))(
            params, golden["x"], golden["y"])
    np.testing.assert_allclose(out_x, golden["out_x"], atol=1e-4, err_msg="infrared output")
    np.testing.assert_allclose(out_y, golden["out_y"], atol=1e-4, err_msg="visible output")
