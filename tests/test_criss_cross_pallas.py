"""The Pallas criss-cross kernel against the jnp reference (interpret mode on CPU), the dispatcher,
CAIM through the kernel against the authors' golden vectors, and GPU (Triton) lowering.

On a GPU the same parity tests run the compiled Triton kernels (`INTERPRET` is False there), with
full-precision float32 matmuls in the reference (no TF32), so `benchmarks/gpu_suite.sh kernel`
checks the real kernels."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmfuse_jax.models import criss_cross_pallas as ccp
from dmfuse_jax.models.criss_cross import criss_cross_attention, criss_cross_reference
from dmfuse_jax.models.criss_cross_pallas import criss_cross_pallas


from helpers import caim_inputs as _inputs, golden_caim_params

INTERPRET = jax.default_backend() != "gpu"


def _out_and_grads(fn, q, k, v, ct):
    """fn(q, k, v) and the gradients of <fn(q, k, v), ct>, in one compiled call."""
    def run(q, k, v, ct):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(ct.astype(out.dtype))
    with jax.default_matmul_precision("float32"):  # no TF32 in the reference on GPUs
        return jax.jit(run)(q, k, v, ct)


# (B, H, W), block: odd sizes (7x13), CAIM's golden size (12x20), a height-1 map (every column entry
# is the masked centre) and an odd map spanning several key blocks in both directions (online
# rescaling across blocks, padding inside the last block).
CASES = [((2, 7, 13), 64), ((1, 12, 20), 64), ((1, 1, 5), 64), ((1, 19, 35), 16)]


@pytest.mark.parametrize("shape,block", CASES, ids=lambda c: "x".join(map(str, c)) if isinstance(c, tuple) else f"block{c}")
def test_kernel_matches_reference_outputs_and_gradients(shape, block):
    q, k, v, ct = _inputs(shape)
    kernel = functools.partial(criss_cross_pallas, block=block, interpret=INTERPRET)
    out, grads = _out_and_grads(kernel, q, k, v, ct)
    ref, ref_grads = _out_and_grads(criss_cross_reference, q, k, v, ct)
    assert out.shape == ref.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0, err_msg="forward")
    for name, g, r in zip("qkv", grads, ref_grads):
        assert g.shape == r.shape, name
        np.testing.assert_allclose(g, r, atol=1e-5, rtol=0, err_msg=f"d{name}")


def test_kernel_bf16_keeps_float32_statistics():
    """bf16 inputs: bf16 output, within bf16 rounding of the float32 result on the same inputs."""
    q, k, v, ct = _inputs((1, 12, 20), dtype=jnp.bfloat16)
    out, grads = _out_and_grads(functools.partial(criss_cross_pallas, interpret=INTERPRET), q, k, v, ct)
    assert out.dtype == jnp.bfloat16
    ref32 = criss_cross_reference(*(x.astype(jnp.float32) for x in (q, k, v)))
    err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref32)))
    assert err < 1.5e-2, f"bf16 kernel differs from the float32 reference by {err}"
    assert all(g.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(g.astype(jnp.float32)))) for g in grads)


def test_kernel_rejects_mismatched_shapes():
    q = jnp.zeros((1, 4, 5, 4))
    with pytest.raises(ValueError, match="expected q, k"):
        criss_cross_pallas(q, jnp.zeros((1, 4, 6, 4)), jnp.zeros((1, 4, 5, 8)))
    with pytest.raises(ValueError, match="power of two"):
        criss_cross_pallas(q, q, jnp.zeros((1, 4, 5, 8)), block=24)


def test_dispatcher_picks_reference_off_gpu_and_honours_forcing(monkeypatch):
    """'auto' is the reference off-GPU and the kernel on GPU; 'pallas' / 'reference' force a path.
    The kernel is stubbed here (its numerics are tested above): this checks the routing only."""
    q, k, v, _ = _inputs((1, 5, 6), cv=8)
    calls = []
    monkeypatch.setattr(ccp, "criss_cross_pallas", lambda q, k, v: calls.append(q.shape) or -v)
    ref = criss_cross_reference(q, k, v)
    np.testing.assert_array_equal(criss_cross_attention(q, k, v, "reference"), ref)
    auto = criss_cross_attention(q, k, v, "auto")
    on_gpu = jax.default_backend() == "gpu"
    assert len(calls) == int(on_gpu), f"'auto' on {jax.default_backend()} took the wrong path"
    if not on_gpu:
        np.testing.assert_array_equal(auto, ref)
    np.testing.assert_array_equal(criss_cross_attention(q, k, v, "pallas"), -v)
    assert calls[-1] == q.shape, "impl='pallas' did not run the kernel"
    with pytest.raises(ValueError, match="unknown criss-cross attention impl"):
        criss_cross_attention(q, k, v, "cuda")


def test_caim_through_kernel_matches_authors_golden_vectors():
    """The released CAIM weights with gamma = 1 (attention dominates) against the authors' PyTorch."""
    from dmfuse_jax.models.fusion_head import CAIM

    params, golden = golden_caim_params()
    with jax.default_matmul_precision("float32"):  # no TF32 on GPUs
        out_x, out_y = jax.jit(lambda p, x, y: CAIM(impl="pallas").apply({"params": p}, x, y))(
            params, golden["x"], golden["y"])
    np.testing.assert_allclose(out_x, golden["out_x"], atol=1e-4, err_msg="infrared output")
    np.testing.assert_allclose(out_y, golden["out_y"], atol=1e-4, err_msg="visible output")
    assert float(np.abs(golden["out_x"] - golden["x"]).max()) > 0.1  # the attention term is visible


@pytest.mark.parametrize("dtype,shape", [(jnp.float32, (2, 12, 20)), (jnp.bfloat16, (1, 144, 200))],
                         ids=["f32-12x20", "bf16-144x200"])
def test_kernel_lowers_to_triton_for_gpu(dtype, shape):
    """No GPU needed: lowering for CUDA runs the Pallas->Triton IR lowering of all six kernels
    (forward and backward), here also with padded sequence lengths that are not powers of two.
    Triton's own compilation to PTX still needs a GPU."""
    q = jax.ShapeDtypeStruct(shape + (4,), dtype)
    v = jax.ShapeDtypeStruct(shape + (32,), dtype)
    fwd = functools.partial(criss_cross_pallas, interpret=False)
    grad = jax.grad(lambda q, k, v: jnp.sum(fwd(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))
    n_fwd = jax.jit(fwd).trace(q, q, v).lower(lowering_platforms=("cuda",)).as_text().count("xla.gpu.triton")
    n_all = jax.jit(grad).trace(q, q, v).lower(lowering_platforms=("cuda",)).as_text().count("xla.gpu.triton")
    assert (n_fwd, n_all) == (2, 6), (n_fwd, n_all)
