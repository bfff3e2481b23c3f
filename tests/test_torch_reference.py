"""The PyTorch reference model: the authors' golden vectors, strict loading of their state_dicts, and
equality with our JAX model through the weight converter (the check compare_torch.py relies on)."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch_references import dmfuse as tr  # noqa: E402

from conftest import GOLDEN, ROOT, WEIGHTS  # noqa: E402


def _nchw(a):
    return torch.as_tensor(np.array(a)).permute(0, 3, 1, 2)


def _nhwc(t):
    return t.detach().permute(0, 2, 3, 1).float().numpy()


@pytest.fixture(scope="module")
def tiny_cfg():
    from dmfuse_jax.config_lib import load_config
    return load_config(str(ROOT / "configs" / "tiny.py"))


def test_unet_reproduces_authors_golden_vectors(tiny_cfg):
    model = tr.build_torch_dmfuse(tiny_cfg)
    model.unet.load_state_dict(torch.load(GOLDEN / "sr3_unet_tiny.pth", map_location="cpu", weights_only=True),
                               strict=True)
    io = np.load(GOLDEN / "sr3_unet_tiny_io.npz")
    x, g = _nchw(io["x"]), torch.as_tensor(io["noise_level"])
    with torch.no_grad():
        np.testing.assert_allclose(_nhwc(model.unet(x, g)), io["out"], atol=2e-5, err_msg="UNet output")
        taps = model.unet(x, g, taps=True)
    assert len(taps) == 5
    for i, t in enumerate(taps):
        np.testing.assert_allclose(_nhwc(t), io[f"tap{i + 1}"], atol=2e-5, err_msg=f"tap {i + 1}")


def test_head_loads_released_weights_strictly_and_reproduces_golden():
    head = tr.TorchFusionHead()
    head.load_state_dict(torch.load(WEIGHTS / "dmfuse_fusion_head.pth", map_location="cpu", weights_only=True),
                         strict=True)
    h = np.load(GOLDEN / "fusion_head_io.npz")
    with torch.no_grad():
        fused = head([_nchw(h[f"ir_level{i}"]) for i in range(1, 6)],
                     [_nchw(h[f"vi_level{i}"]) for i in range(1, 6)])
        np.testing.assert_allclose(_nhwc(fused), h["fused"], atol=1e-5, err_msg="fused")
        c = np.load(GOLDEN / "caim_gamma1_io.npz")
        head.crossatten.gamma.fill_(1.0)
        out_x, out_y = head.crossatten(_nchw(c["x"]), _nchw(c["y"]))
    np.testing.assert_allclose(_nhwc(out_x), c["out_x"], atol=1e-5, err_msg="CAIM infrared output")
    np.testing.assert_allclose(_nhwc(out_y), c["out_y"], atol=1e-5, err_msg="CAIM visible output")


def test_sdpa_attention_matches_the_shipped_einsum_attention(tiny_cfg):
    torch.manual_seed(0)
    model = tr.build_torch_dmfuse(tiny_cfg)
    sdpa = tr.build_torch_dmfuse(tiny_cfg, attention="sdpa")
    sdpa.load_state_dict(model.state_dict(), strict=True)
    x, g = torch.randn(2, 3, 32, 32), torch.tensor([0.9, 0.3])
    with torch.no_grad():
        np.testing.assert_allclose(sdpa.unet(x, g).numpy(), model.unet(x, g).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="unknown attention"):
        tr.SelfAttention(8, 8, attention="flash")


def test_noise_sampling_layout(tiny_cfg):
    """x_t is timestep-major, then modality (infrared first), then image; g lies in its step's interval."""
    model = tr.build_torch_dmfuse(tiny_cfg)
    ir, vi = torch.full((2, 1, 16, 16), 0.5), torch.full((2, 1, 16, 16), -0.5)
    gen = torch.Generator().manual_seed(0)
    x_t, g = model.noisy_inputs(ir, vi, eps=torch.zeros(12, 3, 16, 16), generator=gen)
    table = model.sqrt_acp_prev
    for i, t in enumerate(model.timesteps):
        gi = g[i * 4:(i + 1) * 4]
        assert bool(((gi >= table[t]) & (gi <= table[t - 1])).all()), f"g outside step {t}'s interval"
    # zero noise: x_t = g * x0, so the sign tells the modality.
    signs = torch.sign(x_t[:, 0, 0, 0]).reshape(3, 2, 2)
    assert bool((signs[:, 0] > 0).all() and (signs[:, 1] < 0).all())


def test_whole_model_equals_ours_through_the_converter(tiny_cfg):
    """Random PyTorch weights -> our converter -> the JAX model: same fused image on an odd-sized
    pair (padding, crop) with an RGB visible input (luma), the same noise fed to both."""
    import jax

    from dmfuse_jax.models import build_dmfuse

    torch.manual_seed(0)
    tm = tr.build_torch_dmfuse(tiny_cfg)
    with torch.no_grad():
        tm.head.crossatten.gamma.fill_(1.0)  # let CAIM matter
    params = tr.to_flax_params(tm, tiny_cfg)
    jm = build_dmfuse(tiny_cfg)
    rng = np.random.default_rng(0)
    ir = rng.uniform(-1, 1, (2, 40, 56, 1)).astype(np.float32)
    vi = rng.uniform(-1, 1, (2, 40, 56, 3)).astype(np.float32)
    key = jax.random.PRNGKey(3)

    def fuse_and_noise(p, ir, vi):
        fused = jm.apply(p, ir, vi, rngs={"noise": key})
        noisy = jm.apply(p, ir, vi, rngs={"noise": key}, method=jm.diffusion_inputs)  # the same noise
        return fused, noisy

    fused, (x_t, g) = jax.jit(fuse_and_noise)(params, ir, vi)
    with torch.no_grad():
        tf = tm(_nchw(ir), _nchw(vi), noisy=(_nchw(x_t), torch.as_tensor(np.array(g))))
    fused = np.asarray(fused)
    assert tf.shape == (2, 1, 40, 56)
    assert fused.std() > 1e-3  # a non-trivial image, so equality means something
    np.testing.assert_allclose(_nhwc(tf), fused, atol=1e-5, err_msg="PyTorch vs JAX fused image")
