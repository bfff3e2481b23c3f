"""Conversion error reporting: missing, unexpected and mis-shaped keys are all listed."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import GOLDEN, WEIGHTS
from dmfuse_jax.conversion import ConversionError, convert_fusion_head, convert_unet, load_torch_state_dict
from dmfuse_jax.models import build_fusion_head, build_unet


def _unet_template(config, size=64):
    unet = build_unet(config)
    return jax.eval_shape(lambda: unet.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), jnp.ones((1,))))["params"]


def test_unet_conversion_lists_every_problem(tiny_config):
    sd = load_torch_state_dict(str(GOLDEN / "sr3_unet_tiny.pth"))
    del sd["init_conv.weight"]
    sd["extra.layer.weight"] = np.zeros((3,), np.float32)
    sd["downs.0.res_block.block1.block.3.weight"] = np.zeros((8, 8, 5, 5), np.float32)
    with pytest.raises(ConversionError) as e:
        convert_unet(sd, _unet_template(tiny_config))
    msg = str(e.value)
    assert "missing (" in msg and "init_conv/kernel" in msg
    assert "unexpected (" in msg and "extra.layer.weight" in msg
    assert "mis-shaped (" in msg and "downs.0.res_block.block1.block.3.weight" in msg


def test_unet_weights_of_another_width_are_rejected(quarter_config):
    sd = load_torch_state_dict(str(GOLDEN / "sr3_unet_tiny.pth"))
    with pytest.raises(ConversionError, match="mis-shaped"):
        convert_unet(sd, _unet_template(quarter_config, 256))


def test_head_rejects_unknown_keys(quarter_config):
    head = build_fusion_head(quarter_config)
    feats = [jnp.zeros((1, 64 >> i, 48 >> i, 3 * c)) for i, c in enumerate((32, 64, 128, 256, 256))]
    template = jax.eval_shape(lambda: head.init(jax.random.PRNGKey(0), feats, feats))["params"]
    sd = load_torch_state_dict(str(WEIGHTS / "dmfuse_fusion_head.pth"))
    sd["decoder.extra.weight"] = np.zeros((1,), np.float32)
    with pytest.raises(ConversionError, match="decoder.extra.weight"):
        convert_fusion_head(sd, template)


def test_cuda_saved_weights_load_on_cpu():
    sd = load_torch_state_dict(str(WEIGHTS / "dmfuse_fusion_head.pth"))
    assert sum(v.size for v in sd.values()) == 651_006
    assert all(v.dtype == np.float32 for v in sd.values())
