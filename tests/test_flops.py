"""The analytic FLOP count (dmfuse_jax/flops.py) against XLA's own cost analysis on CPU."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from conftest import ROOT
from dmfuse_jax import flops
from dmfuse_jax.config_lib import load_config


def _xla(fn, *args) -> float:
    return flops.xla_flops(jax.jit(fn).lower(*args).compile())


def test_single_conv_dot_and_scan_match_xla_exactly():
    x = jnp.ones((2, 12, 10, 6))
    w = jnp.ones((3, 3, 6, 5))
    conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "VALID",
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert flops.count(conv, x, w).conv == _xla(conv, x, w) == 2 * 2 * 10 * 8 * 5 * 3 * 3 * 6
    a, b = jnp.ones((4, 7, 9)), jnp.ones((4, 9, 3))
    mm = lambda a, b: jnp.einsum("bij,bjk->bik", a, b)
    assert flops.count(mm, a, b).dot == _xla(mm, a, b) == 2 * 4 * 7 * 3 * 9
    scanned = lambda a, b: jax.lax.map(lambda ai: mm(ai, b), a[None].repeat(5, 0))
    assert flops.count(scanned, a, b).dot == 5 * 2 * 4 * 7 * 3 * 9


@pytest.fixture(scope="module")
def tiny():
    """The tiny config cut to three levels (attention at the middle and at 1/2): quick to compile."""
    return load_config(str(ROOT / "configs/tiny.py"), ["model.unet.channel_mults=[1,2,2]",
                                                       "model.unet.image_size=32"])


def test_tiny_unet_forward_and_backward_agree_with_xla_cost_analysis(tiny):
    """Whole model, forward and gradient: XLA also counts elementwise work (more) and skips the
    kernel taps that fall on zero padding (less); both are a few percent at 48x64 (forward 3.6%,
    forward+backward 6.0% more by XLA when measured; a missing backward convolution would be ~30%)."""
    from dmfuse_jax.models import build_unet

    unet = build_unet(tiny)
    x, g = jnp.zeros((1, 48, 64, 3)), jnp.ones((1,))
    params = jax.eval_shape(lambda: unet.init(jax.random.PRNGKey(0), x, g))["params"]
    fwd = lambda p, x, g: unet.apply({"params": p}, x, g)
    loss = jax.grad(lambda p, x, g: jnp.sum(fwd(p, x, g) ** 2))
    ours_fwd, ours_grad = flops.count(fwd, params, x, g).total, flops.count(loss, params, x, g).total
    assert ours_fwd == flops.unet_forward(tiny, 48, 64).total
    for name, ours, xla in (("forward", ours_fwd, _xla(fwd, params, x, g)),
                            ("forward+backward", ours_grad, _xla(loss, params, x, g))):
        assert abs(ours / xla - 1) < 0.08, f"{name}: analytic {ours:.4g} vs XLA {xla:.4g}"
    # the backward of every trained layer costs two forwards (input and weight gradients)
    assert 2.9 < ours_grad / ours_fwd < 3.1, ours_grad / ours_fwd


def test_fused_pair_is_six_tap_passes_plus_the_head(tiny):
    from dmfuse_jax.models import build_fusion_head

    taps = flops.unet_forward(tiny, 48, 64, batch=6, taps=True)
    head = build_fusion_head(tiny)
    feats = [jnp.zeros((1, 48 >> i, 64 >> i, 3 * c)) for i, c in enumerate((8, 16, 16))]
    params = jax.eval_shape(lambda: head.init(jax.random.PRNGKey(0), feats, feats))["params"]
    head_flops = flops.count(lambda p, f: head.apply({"params": p}, f, f), params, feats)
    assert flops.fuse_pairs(tiny, 48, 64).total == taps.total + head_flops.total


def test_uncountable_kernels_are_refused():
    from dmfuse_jax.models.criss_cross_pallas import criss_cross_pallas

    q = jnp.ones((1, 8, 8, 4))
    with pytest.raises(ValueError, match="portable config"):
        flops.count(lambda q: criss_cross_pallas(q, q, q), q)
