"""UNet self-attention: the query-chunked path equals the dense one, bf16 inputs under
dtype=bfloat16, and 'cudnn' is never fed float32 or a head wider than cuDNN takes."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmfuse_jax.models import build_unet
from dmfuse_jax.models import unet as unet_mod


def _qkv(dtype, b=2, n=300, c=16):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    return [jax.random.normal(k, (b, n, c)).astype(dtype) for k in (k1, k2, k3)]


def test_chunked_attention_equals_dense_forward_and_gradient():
    q, k, v = _qkv(jnp.float32)  # 300 tokens in blocks of 128: the last block is padded
    scale = 0.25
    dense = unet_mod.dense_attention(q, k, v, scale)
    chunked = unet_mod.chunked_attention(q, k, v, scale, block=128)
    np.testing.assert_allclose(chunked, dense, atol=2e-6, rtol=1e-5)
    loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))
    g_dense = jax.grad(loss(lambda *a: unet_mod.dense_attention(*a, scale)), argnums=(0, 1, 2))(q, k, v)
    g_chunk = jax.grad(loss(lambda *a: unet_mod.chunked_attention(*a, scale, block=128)), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_chunk, g_dense):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
    qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
    np.testing.assert_allclose(unet_mod.chunked_attention(qb, kb, vb, scale, block=128).astype(jnp.float32),
                               unet_mod.dense_attention(qb, kb, vb, scale).astype(jnp.float32), atol=2e-2)


def _primitives(jaxpr, acc=None):
    acc = set() if acc is None else acc
    for eqn in jaxpr.eqns:
        acc.add(eqn.primitive.name)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            _primitives(sub, acc)
    return acc


def _attention_dot_dtypes(jaxpr, acc=None):
    """Input dtypes of the batched matmuls (rank >= 3 operands: only attention's in the UNet)."""
    acc = set() if acc is None else acc
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general" and eqn.invars[0].aval.ndim >= 3:
            acc.add(tuple(str(v.aval.dtype) for v in eqn.invars))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            _attention_dot_dtypes(sub, acc)
    return acc


def _unet_and_params(tiny_config, impl, dtype):
    """The tiny UNet cut to three levels: attention at 1/2 (256 tokens at 32x32) and the middle (64)."""
    cfg = tiny_config.copy_and_resolve_references()
    cfg.model.unet.attention_impl = impl
    cfg.model.unet.channel_mults = (1, 2, 2)
    cfg.model.unet.image_size = 32
    unet = build_unet(cfg, dtype)
    x, g = jnp.zeros((1, 32, 32, 3)), jnp.ones((1,))
    return unet, jax.eval_shape(lambda: unet.init(jax.random.PRNGKey(0), x, g))["params"], x, g


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_bf16_unet_attention_matmuls_take_bf16_inputs(tiny_config, impl):
    unet, params, x, g = _unet_and_params(tiny_config, impl, "bfloat16")
    jaxpr = jax.make_jaxpr(lambda p: unet.apply({"params": p}, x, g))(params)
    dtypes = _attention_dot_dtypes(jaxpr.jaxpr)
    assert dtypes == {("bfloat16", "bfloat16")}, f"attention matmul inputs under bf16: {dtypes}"


def test_xla_attention_chunks_above_the_token_threshold_with_the_same_result(tiny_config, monkeypatch):
    unet, shapes, x, g = _unet_and_params(tiny_config, "xla", "float32")
    x = jax.random.normal(jax.random.PRNGKey(1), x.shape)
    params = jax.tree_util.tree_map(
        lambda s: 0.3 * jax.random.normal(jax.random.PRNGKey(s.size), s.shape), shapes)
    run = lambda m: jax.jit(lambda p: m.apply({"params": p}, x, g))
    dense = run(unet)(params)
    assert "scan" not in _primitives(jax.make_jaxpr(run(unet))(params).jaxpr)
    monkeypatch.setattr(unet_mod, "CHUNK_ABOVE_TOKENS", 128)  # the 256-token attention chunks
    monkeypatch.setattr(unet_mod, "QUERY_BLOCK", 96)
    assert "scan" in _primitives(jax.make_jaxpr(run(unet))(params).jaxpr)
    np.testing.assert_allclose(run(unet)(params), dense, atol=1e-5, rtol=1e-5)
    # cuDNN's fused attention takes no float32: a float32 model with 'cudnn' runs the XLA path
    np.testing.assert_allclose(run(unet.clone(attention_impl="cudnn"))(params), dense, atol=1e-5, rtol=1e-5)


def test_cudnn_attention_leaves_wide_heads_to_xla():
    """cuDNN's fused attention refuses head dims above 128 (the paper-size UNet's 256-channel layer):
    'cudnn' traces the XLA attention there, and cuDNN's custom call for a 64-wide head."""
    def calls(c):
        q = jax.ShapeDtypeStruct((1, 64, c), jnp.bfloat16)
        fn = lambda q: unet_mod.ATTENTION_IMPLS["cudnn"](q, q, q, 0.125)  # noqa: E731
        from dmfuse_jax.commands.compile import _CudnnAsserted
        with _CudnnAsserted():
            return jax.jit(fn).trace(q).lower(lowering_platforms=("cuda",)).as_text().count("__cudnn$fmha")
    assert calls(64) == 1
    assert calls(256) == 0 and calls(unet_mod.CUDNN_MAX_HEAD_DIM + 8) == 0


def test_criss_cross_auto_falls_back_to_the_reference_when_the_kernel_does_not_lower(monkeypatch, caplog):
    """'auto' on a GPU whose Pallas Triton lowering fails (here: a CPU posing as a GPU, where the
    non-interpret lowering cannot work) uses the jnp reference, with a warning, instead of failing."""
    from dmfuse_jax.models import criss_cross as cc

    q = jax.random.normal(jax.random.PRNGKey(0), (1, 6, 5, 4))
    v = jax.random.normal(jax.random.PRNGKey(1), (1, 6, 5, 8))
    cc._pallas_available.cache_clear()
    monkeypatch.setattr(cc.jax, "default_backend", lambda: "gpu")
    try:
        with caplog.at_level("WARNING", logger=cc.__name__):
            out = cc.criss_cross_attention(q, q, v, impl="auto")
        assert "using the jnp reference" in caplog.text
    finally:
        cc._pallas_available.cache_clear()
    np.testing.assert_array_equal(out, cc.criss_cross_reference(q, q, v))
