"""Parity with the authors' PyTorch model: every array in ../shared/golden to <= 1e-4 (fp32, CPU)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import GOLDEN, WEIGHTS
from dmfuse_jax.conversion import convert_fusion_head, convert_unet, load_torch_state_dict
from dmfuse_jax.models import CAIM, build_fusion_head, build_unet

TOL = 1e-4
LEVELS = range(1, 6)


@pytest.fixture(scope="module")
def golden_unet(tiny_config):
    unet = build_unet(tiny_config)
    template = jax.eval_shape(lambda: unet.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), jnp.ones((1,))))
    params = convert_unet(load_torch_state_dict(str(GOLDEN / "sr3_unet_tiny.pth")), template["params"])
    return unet, params, np.load(GOLDEN / "sr3_unet_tiny_io.npz")


@pytest.fixture(scope="module")
def released_head(quarter_config):
    head = build_fusion_head(quarter_config)
    io = np.load(GOLDEN / "fusion_head_io.npz")
    ir = [io[f"ir_level{i}"] for i in LEVELS]
    vi = [io[f"vi_level{i}"] for i in LEVELS]
    template = jax.eval_shape(lambda: head.init(jax.random.PRNGKey(0), ir, vi))["params"]
    report: list[str] = []
    params = convert_fusion_head(load_torch_state_dict(str(WEIGHTS / "dmfuse_fusion_head.pth")), template, report=report)
    return head, params, io, report


def test_golden_unet_param_count(golden_unet):
    _, params, _ = golden_unet
    assert sum(x.size for x in jax.tree_util.tree_leaves(params)) == 1_475_867


def test_golden_unet_output(golden_unet):
    unet, params, io = golden_unet
    out = unet.apply({"params": params}, io["x"], io["noise_level"])
    np.testing.assert_allclose(out, io["out"], atol=TOL, rtol=0)


def test_golden_unet_taps(golden_unet):
    unet, params, io = golden_unet
    taps = unet.apply({"params": params}, io["x"], io["noise_level"], taps=True)
    assert len(taps) == 5
    for i, tap in enumerate(taps, start=1):
        assert tap.shape == io[f"tap{i}"].shape, f"tap{i} shape"
        np.testing.assert_allclose(tap, io[f"tap{i}"], atol=TOL, rtol=0, err_msg=f"tap{i}")


def test_released_head_unused_keys_reported(released_head):
    *_, report = released_head
    assert sorted({k.split(".")[0] for k in report}) == ["conv_in2", "conv_in3", "conv_in4", "conv_in5", "conv_t2", "conv_t3"]


def test_released_head_reducers(released_head):
    head, params, io, _ = released_head
    for side in ("ir", "vi"):
        reduced = head.apply({"params": params}, [io[f"{side}_level{i}"] for i in LEVELS], method=lambda m, f: m.reduce(f))
        for i, r in zip(LEVELS, reduced):
            np.testing.assert_allclose(r, io[f"reduced_{side}_level{i}"], atol=TOL, rtol=0, err_msg=f"reducer {side} level {i}")


def test_released_head_caim(released_head):
    head, params, io, _ = released_head
    ir = [io[f"reduced_ir_level{i}"] for i in LEVELS]
    vi = [io[f"reduced_vi_level{i}"] for i in LEVELS]
    out = head.apply({"params": params}, ir, vi, method=lambda m, a, b: m.interact(a, b))
    for i, o in zip(LEVELS, out):
        np.testing.assert_allclose(o, io[f"caim_level{i}"], atol=TOL, rtol=0, err_msg=f"CAIM level {i}")


def test_released_head_fused(released_head):
    head, params, io, _ = released_head
    fused = head.apply({"params": params}, [io[f"ir_level{i}"] for i in LEVELS], [io[f"vi_level{i}"] for i in LEVELS])
    np.testing.assert_allclose(fused, io["fused"], atol=TOL, rtol=0)


def test_caim_gamma_one(released_head):
    """With gamma = 1 the attention term dominates, so this checks the criss-cross maths itself."""
    _, params, _, _ = released_head
    io = np.load(GOLDEN / "caim_gamma1_io.npz")
    p = dict(params["crossatten"], gamma=np.ones((1,), np.float32))
    out_x, out_y = CAIM(impl="reference").apply({"params": p}, io["x"], io["y"])
    assert np.abs(io["out_x"] - io["x"]).max() > 0.1  # the attention term is not negligible here
    np.testing.assert_allclose(out_x, io["out_x"], atol=TOL, rtol=0, err_msg="CAIM infrared output")
    np.testing.assert_allclose(out_y, io["out_y"], atol=TOL, rtol=0, err_msg="CAIM visible output")
