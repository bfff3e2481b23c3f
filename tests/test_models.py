"""The SR3 UNet, the feature extractor and the whole DMFuse model: shapes, sizes, frozen UNet."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import DATA
from dmfuse_jax.data.images import read_image
from dmfuse_jax.models import build_dmfuse, build_unet, to_model_range
from dmfuse_jax.training.fusion_loss import fusion_loss_from_config
from helpers import init_dmfuse_params, init_params


def _init_dmfuse(config, seed=0):
    model = build_dmfuse(config)
    return model, init_dmfuse_params(model, seed)


@pytest.fixture(scope="module")
def tiny_model(tiny_config):
    return _init_dmfuse(tiny_config)


def test_unet_output_and_taps_shapes(tiny_config):
    unet = build_unet(tiny_config)
    x, g = jnp.ones((2, 32, 48, 3)), jnp.array([0.9, 0.2])
    params = init_params(unet, 0, x, g)
    fwd = jax.jit(lambda p, x, g: unet.apply({"params": p}, x, g))
    chex.assert_shape(fwd(params, x, g), (2, 32, 48, 3))
    taps = jax.jit(lambda p, x, g: unet.apply({"params": p}, x, g, taps=True))(params, x, g)
    widths = [8, 16, 32, 64, 64]
    chex.assert_shape(taps, [(2, 32 >> i, 48 >> i, c) for i, c in enumerate(widths)])


def test_unet_attention_placed_from_config_size_not_input(tiny_config):
    """attn_res=16 with config image size 64 -> attention at level 3, whatever the input size."""
    unet = build_unet(tiny_config)
    p_small = init_params(unet, 0, jnp.ones((1, 32, 32, 3)), jnp.ones((1,)))
    p_large = init_params(unet, 0, jnp.ones((1, 128, 128, 3)), jnp.ones((1,)))
    with_attn = sorted(k for k, v in p_small.items() if "attn" in v)
    assert with_attn == ["downs_6", "downs_7", "mid_0", "ups_10", "ups_8", "ups_9"]
    assert jax.tree_util.tree_structure(p_small) == jax.tree_util.tree_structure(p_large)


def test_taps_mode_stops_after_last_tap(tiny_config):
    unet = build_unet(tiny_config)
    x, g = jnp.ones((1, 64, 64, 3)), jnp.ones((1,))
    params = init_params(unet, 0, x, g)

    def flops(**kw):
        cost = jax.jit(lambda p: unet.apply({"params": p}, x, g, **kw)).lower(params).compile().cost_analysis()
        return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]

    # Taps mode skips the last 2 full-resolution blocks and the final conv.
    assert flops(taps=True) < 0.95 * flops()  # ~9% at this size


def test_quarter_unet_parameter_count(quarter_config):
    """The authors' PyTorch count for the 1/4 model with 3 in/out channels."""
    unet = build_unet(quarter_config)
    shapes = jax.eval_shape(lambda: unet.init(jax.random.PRNGKey(0), jnp.zeros((1, 256, 256, 3)), jnp.ones((1,))))
    assert sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes)) == 24_473_315


def test_features_are_taps_concatenated_in_timestep_order(tiny_config, tiny_model):
    model, params = tiny_model
    ir = jax.random.uniform(jax.random.PRNGKey(2), (2, 32, 32, 1), minval=-1, maxval=1)
    vi = jax.random.uniform(jax.random.PRNGKey(3), (2, 32, 32, 1), minval=-1, maxval=1)
    key = jax.random.PRNGKey(7)
    ir_f, vi_f = jax.jit(lambda p: model.apply({"params": p}, ir, vi, rngs={"noise": key},
                                               method=model.extract_features))(params)
    widths = [8, 16, 32, 64, 64]
    chex.assert_shape(ir_f, [(2, 32 >> i, 32 >> i, 3 * c) for i, c in enumerate(widths)])
    # Recompute by hand: the same noise, one UNet call per (timestep, modality).
    x_t, g = model.apply({"params": params}, ir, vi, rngs={"noise": key},
                         method=model.diffusion_inputs)
    taps = jax.jit(lambda p: model.unet.apply({"params": p}, x_t, g, taps=True))(params["unet"])
    for level, (f_ir, f_vi, tap) in enumerate(zip(ir_f, vi_f, taps)):
        c = widths[level]
        tap = tap.reshape((3, 2, 2) + tap.shape[1:])  # (timestep, modality, batch, ...)
        for ti in range(3):
            np.testing.assert_allclose(f_ir[..., ti * c:(ti + 1) * c], tap[ti, 0], atol=1e-5, err_msg=f"ir level {level + 1} t#{ti}")
            np.testing.assert_allclose(f_vi[..., ti * c:(ti + 1) * c], tap[ti, 1], atol=1e-5, err_msg=f"vi level {level + 1} t#{ti}")


def test_noise_levels_come_from_each_timestep_interval(tiny_model):
    model, params = tiny_model
    x = jnp.zeros((4, 16, 16, 1))
    _, g = model.apply({"params": params}, x, x, rngs={"noise": jax.random.PRNGKey(0)},
                       method=model.diffusion_inputs)
    table = model.schedule.sqrt_alphas_cumprod_prev
    g = np.asarray(g).reshape(3, 8)
    for i, t in enumerate((5, 50, 100)):
        assert np.all(g[i] >= table[t] - 1e-6) and np.all(g[i] <= table[t - 1] + 1e-6), f"t={t}"


@pytest.mark.parametrize("shape", [(1, 37, 53, 1), (3, 20, 16, 3), (2, 64, 40, 1)])
def test_dmfuse_any_size_batch_and_channels(tiny_model, shape):
    model, params = tiny_model
    ir = jax.random.uniform(jax.random.PRNGKey(0), shape, minval=-1, maxval=1)
    vi = jax.random.uniform(jax.random.PRNGKey(1), shape, minval=-1, maxval=1)
    out = jax.jit(lambda p: model.apply({"params": p}, ir, vi, rngs={"noise": jax.random.PRNGKey(0)}))(params)
    chex.assert_shape(out, shape[:3] + (1,))
    chex.assert_tree_all_finite(out)
    assert float(jnp.max(jnp.abs(out))) <= 1.0


def test_dmfuse_is_reproducible_from_the_noise_key(tiny_model):
    model, params = tiny_model
    params = {"unet": params["unet"], "head": dict(params["head"])}
    params["head"]["crossatten"] = dict(params["head"]["crossatten"], gamma=np.ones((1,), np.float32))
    x = jax.random.uniform(jax.random.PRNGKey(0), (1, 32, 32, 1), minval=-1, maxval=1)
    y = jax.random.uniform(jax.random.PRNGKey(1), (1, 32, 32, 1), minval=-1, maxval=1)
    fuse = jax.jit(lambda p, k: model.apply({"params": p}, x, y, rngs={"noise": jax.random.PRNGKey(k)}),
                   static_argnums=1)
    run = lambda k: fuse(params, k)
    np.testing.assert_array_equal(run(3), run(3))
    assert float(jnp.max(jnp.abs(run(3) - run(4)))) > 0


def test_no_gradient_reaches_the_unet(tiny_config, tiny_model):
    model, params = tiny_model
    ir = jax.random.uniform(jax.random.PRNGKey(0), (2, 32, 32, 1), minval=-1, maxval=1)
    vi = jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 32, 1), minval=-1, maxval=1)

    def loss(p):
        fused = model.apply({"params": p}, ir, vi, rngs={"noise": jax.random.PRNGKey(0)})
        return fusion_loss_from_config(fused, ir, vi, tiny_config.loss)[0]

    grads = jax.jit(jax.grad(loss))(params)
    unet_norm = sum(float(jnp.sum(jnp.abs(g))) for g in jax.tree_util.tree_leaves(grads["unet"]))
    head_norm = sum(float(jnp.sum(jnp.abs(g))) for g in jax.tree_util.tree_leaves(grads["head"]))
    assert unet_norm == 0.0, "gradient leaked into the frozen diffusion UNet"
    assert head_norm > 0.0, "the fusion head received no gradient"


def test_mismatched_pair_is_rejected(tiny_model):
    model, params = tiny_model
    with pytest.raises(ValueError, match="differ"):
        model.apply({"params": params}, jnp.zeros((1, 32, 32, 1)), jnp.zeros((1, 32, 48, 1)),
                    rngs={"noise": jax.random.PRNGKey(0)})


def test_quarter_model_fuses_a_tno_pair_on_cpu(quarter_config):
    """The paper's 1/4 model on a real 270x360 TNO pair returns a finite (270, 360) image."""
    ir_path = DATA / "tno" / "ir"
    sizes = {p.name: read_image(p).shape[:2] for p in sorted(ir_path.iterdir())}
    name = next(n for n, s in sizes.items() if s == (270, 360))
    ir = read_image(ir_path / name)[None]
    vi = read_image(DATA / "tno" / "vi" / name)[None]
    model = build_dmfuse(quarter_config)
    params = init_dmfuse_params(model, 0)
    rng = quarter_config.model.input_range
    fuse = jax.jit(lambda p, a, b: model.apply({"params": p}, a, b, rngs={"noise": jax.random.PRNGKey(0)}))
    out = np.asarray(fuse(params, to_model_range(ir, rng), to_model_range(vi, rng)))
    assert out.shape == (1, 270, 360, 1)
    assert np.isfinite(out).all()
