"""Mixed precision (config.model.dtype = 'bfloat16'): float32 params and statistics, bf16 compute,
and a bound on the fused-image difference from float32 on a real TNO crop."""
from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np

from dmfuse_jax.models import build_dmfuse, from_model_range, to_model_range

from conftest import DATA

NOISE_KEYS = {"params": jax.random.PRNGKey(0), "noise": jax.random.PRNGKey(1)}


def _random_params(model, x, seed=0):
    """Fan-in-scaled random weights from the parameter shapes (no init compile): kernels
    N(0, 1/fan_in), biases N(0, 0.05^2), GroupNorm scales 1 + N(0, 0.1^2), CAIM gamma = 1."""
    shapes = jax.eval_shape(lambda: model.init(NOISE_KEYS, x, x))
    rng = np.random.default_rng(seed)

    def init(path, s):
        name = path[-1].key
        if name == "kernel":
            return rng.normal(0, 1 / np.sqrt(np.prod(s.shape[:-1])), s.shape).astype(np.float32)
        if name == "scale":
            return (1 + rng.normal(0, 0.1, s.shape)).astype(np.float32)
        if name == "gamma":
            return np.ones(s.shape, np.float32)  # CAIM on: the attention term dominates its output
        return rng.normal(0, 0.05, s.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(init, shapes)


def _primitive_dtypes(jaxpr, acc=None):
    """Counter of (primitive, input dtype) over a jaxpr and its sub-jaxprs."""
    acc = collections.Counter() if acc is None else acc
    for eqn in jaxpr.eqns:
        if eqn.invars and hasattr(eqn.invars[0], "aval"):
            acc[(eqn.primitive.name, str(eqn.invars[0].aval.dtype))] += 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            _primitive_dtypes(sub, acc)
    return acc


def test_bf16_computes_in_bf16_with_float32_params_and_statistics(tiny_config):
    cfg = tiny_config.copy_and_resolve_references()
    cfg.model.dtype = "bfloat16"
    model = build_dmfuse(cfg)
    x = jnp.zeros((1, 32, 48, 1))
    params = jax.eval_shape(lambda: model.init(NOISE_KEYS, x, x))
    assert {str(p.dtype) for p in jax.tree_util.tree_leaves(params)} == {"float32"}
    jaxpr = jax.make_jaxpr(lambda p: model.apply(p, x, x, rngs={"noise": NOISE_KEYS["noise"]}))(params)
    ops = _primitive_dtypes(jaxpr.jaxpr)
    convs = {dt: n for (prim, dt), n in ops.items() if prim == "conv_general_dilated"}
    assert set(convs) == {"bfloat16"}, f"convolutions not all bf16: {convs}"
    # GroupNorm means/variances, softmax maxima/sums and exponentials: float32 only.
    for prim in ("reduce_sum", "reduce_max", "exp", "rsqrt"):
        dts = {dt for (p, dt), n in ops.items() if p == prim}
        assert dts == {"float32"}, f"{prim} runs in {dts}"
    out = jax.eval_shape(lambda p: model.apply(p, x, x, rngs={"noise": NOISE_KEYS["noise"]}), params)
    assert out.dtype == jnp.float32  # the tanh output is float32


def test_bf16_fused_image_close_to_float32_on_tno_crop(tiny_config):
    from dmfuse_jax.data.images import read_image, to_uint8

    ir = read_image(DATA / "tno" / "ir" / "01.png")[None, 96:160, 160:256]  # (1, 64, 96, 1)
    vi = read_image(DATA / "tno" / "vi" / "01.png")[None, 96:160, 160:256]
    cfg = tiny_config.copy_and_resolve_references()
    models = {dt: build_dmfuse(cfg, dt) for dt in ("float32", "bfloat16")}
    a, b = to_model_range(jnp.asarray(ir), "-1_1"), to_model_range(jnp.asarray(vi), "-1_1")
    params = _random_params(models["float32"], a)

    @jax.jit
    def fuse_both(p, a, b):
        return {dt: from_model_range(m.apply(p, a, b, rngs={"noise": jax.random.PRNGKey(7)}), "-1_1")
                for dt, m in models.items()}

    out = fuse_both(params, a, b)
    u32 = to_uint8(np.asarray(out["float32"])[0]).astype(np.float64)
    u16 = to_uint8(np.asarray(out["bfloat16"])[0]).astype(np.float64)
    assert u32.std() > 10, "the float32 fused image is nearly flat: the comparison would be vacuous"
    mse = np.mean((u32 - u16) ** 2)
    psnr = float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)
    print(f"\nbf16 vs float32 fused image (8-bit, 64x96 TNO crop, tiny random model, gamma 1): "
          f"PSNR {psnr:.2f} dB, max |diff| {np.abs(u32 - u16).max():.0f} levels")
    assert psnr > 30.0, f"bf16 fused image too far from float32: PSNR {psnr:.2f} dB"
