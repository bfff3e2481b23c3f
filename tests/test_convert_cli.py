"""`dmfuse convert-torch` with real inputs: the released fusion head plus a 1/4-width SR3 UNet
.pth (made here from random Flax params through an inverse key mapping), and the golden tiny UNet
with a head that does not fit it (the error must name the file and the mis-shaped keys)."""
from __future__ import annotations

import re

import numpy as np
import pytest

from conftest import GOLDEN, ROOT, WEIGHTS

from dmfuse_jax.cli import main
from dmfuse_jax.inference import bundle as bundle_lib
from dmfuse_jax.inference.checkpoints import resolve
from dmfuse_jax.inference.fuser import random_params

torch = pytest.importorskip("torch", reason="convert-torch reads .pth files with PyTorch")

HEAD = WEIGHTS / "dmfuse_fusion_head.pth"


def flax_unet_to_torch(params: dict) -> dict[str, np.ndarray]:
    """Inverse of `conversion.convert_unet`: Flax UNet params -> SR3 state_dict (numpy)."""
    from flax import traverse_util

    out = {}
    for path, value in traverse_util.flatten_dict(params).items():
        key = "/".join(path)
        key = re.sub(r"^(downs|ups|mid)_(\d+)/", r"\1.\2/", key)
        key = re.sub(r"^noise_level_mlp_(\d+)/", r"noise_level_mlp.\1/", key)
        key = key.replace("/noise_func/", "/noise_func/noise_func/0/")
        key = re.sub(r"(block1|block2|final_conv)/norm/", r"\1/block/0/", key)
        key = re.sub(r"(block1|block2|final_conv)/conv/", r"\1/block/3/", key)
        key = re.sub(r"/(kernel|scale)$", "/weight", key).replace("/", ".")
        v = np.asarray(value)
        if v.ndim == 4:
            v = v.transpose(3, 2, 0, 1)  # HWIO -> OIHW
        elif v.ndim == 2:
            v = v.T  # (in, out) -> (out, in)
        out[key] = v
    return out


def test_released_head_with_a_quarter_unet_becomes_a_bundle(tmp_path, quarter_config, capsys):
    import jax

    params = random_params(quarter_config, seed=1)
    sd = {k: torch.from_numpy(np.ascontiguousarray(v)).half() for k, v in flax_unet_to_torch(params["unet"]).items()}
    assert "downs.0.res_block.block1.block.0.weight" in sd and "mid.0.attn.qkv.weight" in sd
    torch.save(sd, tmp_path / "unet.pth")
    del sd
    out = tmp_path / "bundle"
    rc = main(["convert-torch", "--unet", str(tmp_path / "unet.pth"), "--head", str(HEAD),
               "--config", str(ROOT / "configs" / "dmfuse_quarter.py"), "--out", str(out), "--store-dtype", "bfloat16"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "skipped 12 keys unused" in text and "conv_in2" in text
    config, got, meta = bundle_lib.load_bundle(out)
    assert meta["param_dtype"] == "bfloat16" and config.model.unet.inner_channels == 32
    # UNet: our params through fp16 (the .pth) and bf16 (the bundle)
    import jax.numpy as jnp
    want_unet = jax.tree_util.tree_map(
        lambda a: np.asarray(jnp.asarray(a.astype(np.float16).astype(np.float32)).astype(jnp.bfloat16), np.float32),
        params["unet"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, got["unet"], want_unet)
    # head: the released numbers, e.g. CAIM gamma = 0.00657 and a reducer kernel in HWIO layout
    head_sd = torch.load(HEAD, map_location="cpu", weights_only=True)
    assert abs(float(got["head"]["crossatten"]["gamma"].reshape(-1)[0]) - float(head_sd["crossatten.gamma"].reshape(-1)[0])) < 1e-4
    w = head_sd["en0.conv1.conv2d.weight"].float().numpy().transpose(2, 3, 1, 0)
    np.testing.assert_allclose(got["head"]["en0"]["conv1"]["conv2d"]["kernel"], w, rtol=1e-2, atol=1e-3)
    # the same pair straight from --checkpoint UNET.pth,HEAD.pth
    ck = resolve(f"{tmp_path / 'unet.pth'},{HEAD}", config=str(ROOT / "configs" / "dmfuse_quarter.py"))
    assert ck.kind == "torch"
    np.testing.assert_allclose(ck.params["head"]["en0"]["conv1"]["conv2d"]["kernel"], w, atol=1e-7)


def test_golden_tiny_unet_with_a_mismatched_head_names_the_file_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "bundle"
    rc = main(["convert-torch", "--unet", str(GOLDEN / "sr3_unet_tiny.pth"), "--head", str(HEAD),
               "--config", str(ROOT / "configs" / "tiny.py"), "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert str(HEAD) in err and "mis-shaped" in err and "en0.conv1.conv2d.weight" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_missing_pth_and_unet_of_another_config(tmp_path, capsys):
    rc = main(["convert-torch", "--unet", str(tmp_path / "nope.pth"), "--head", str(HEAD),
               "--config", str(ROOT / "configs" / "tiny.py"), "--out", str(tmp_path / "b")])
    assert rc == 2 and f"{tmp_path / 'nope.pth'}: no such file" in capsys.readouterr().err
    rc = main(["convert-torch", "--unet", str(GOLDEN / "sr3_unet_tiny.pth"), "--head", str(HEAD),
               "--config", str(ROOT / "configs" / "dmfuse_quarter.py"), "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert rc == 2 and "sr3_unet_tiny.pth" in err and "mis-shaped" in err
    assert not (tmp_path / "b").exists()
