"""`dmfuse convert-npz`: flat npz params (Flax paths joined by "/") -> inference bundle. A bundle made
from npz files fuses exactly as a Fuser built straight from the same npz; bad files exit 2 with one
line naming the file and the key; the shipped default bundle is the width-32 model."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import DATA, ROOT, WEIGHTS

from dmfuse_jax.cli import main
from dmfuse_jax.conversion import npz as npz_lib
from dmfuse_jax.data.images import read_image
from dmfuse_jax.inference import bundle as bundle_lib
from dmfuse_jax.inference import checkpoints
from dmfuse_jax.inference.fuser import Fuser, load, random_params

TINY = str(ROOT / "configs" / "tiny.py")
UNET_NPZ = WEIGHTS / "dmfuse_jax_roadscene_unet_ema_fp16.npz"
HEAD_NPZ = WEIGHTS / "dmfuse_jax_roadscene_head_ema.npz"


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory, tiny_config):
    """The tiny model's random params as a UNet npz (float16, as the shipped UNet file) + a head npz."""
    d = tmp_path_factory.mktemp("npz")
    params = random_params(tiny_config, seed=3)
    unet = npz_lib.save_npz(d / "unet.npz", params["unet"], dtype="float16")
    head = npz_lib.save_npz(d / "head.npz", params["head"])
    return unet, head


def _crop(name="07", box=(40, 104, 60, 124)):
    y0, y1, x0, x1 = box
    return (read_image(DATA / "tno" / "ir" / f"{name}.png")[y0:y1, x0:x1],
            read_image(DATA / "tno" / "vi" / f"{name}.png")[y0:y1, x0:x1])


def _run(capsys, *args):
    capsys.readouterr()
    rc = main(["convert-npz", *map(str, args)])
    return rc, capsys.readouterr()


def test_bundle_from_npz_fuses_as_the_npz_fuser(tmp_path, tiny_config, tiny_npz, capsys):
    unet, head = tiny_npz
    rc, out = _run(capsys, "--unet", unet, "--head", head, "--config", TINY, "--out", tmp_path / "b",
                   "--store-dtype", "float32")
    assert rc == 0, out.err
    assert "wrote inference bundle" in out.out
    assert json.loads((tmp_path / "b" / bundle_lib.MARKER).read_text())["param_dtype"] == "float32"
    want_params = npz_lib.load_model(tiny_config, unet=str(unet), head=str(head))
    want = Fuser(config=tiny_config, params=want_params)
    got = load(str(tmp_path / "b"))
    ir, vi = _crop()
    diff = np.abs(got(ir, vi) - want(ir, vi)).max()
    assert diff <= 1e-6, f"bundle from npz differs from the npz Fuser by {diff}"
    # the float16 UNet file is stored losslessly by a float16 bundle
    rc, out = _run(capsys, "--unet", unet, "--head", head, "--config", TINY, "--out", tmp_path / "b16",
                   "--store-dtype", "float16")
    assert rc == 0, out.err
    _, p16, _ = bundle_lib.load_bundle(tmp_path / "b16")
    for a, b in zip(npz_lib.flatten(p16["unet"]).values(), npz_lib.flatten(want_params["unet"]).values()):
        np.testing.assert_array_equal(a, b)


def test_one_file_with_unet_and_head_prefixes(tmp_path, tiny_config, tiny_npz, capsys):
    unet, head = tiny_npz
    both = {"unet": npz_lib.unflatten(npz_lib.read_npz(unet)), "head": npz_lib.unflatten(npz_lib.read_npz(head))}
    npz_lib.save_npz(tmp_path / "model.npz", both)
    rc, out = _run(capsys, "--params", tmp_path / "model.npz", "--config", TINY, "--out", tmp_path / "b")
    assert rc == 0, out.err
    _, got, _ = bundle_lib.load_bundle(tmp_path / "b")
    for k, v in npz_lib.flatten(both).items():
        np.testing.assert_array_equal(npz_lib.flatten(got)[k], v, err_msg=k)


def _bad_npz(path, flat):
    np.savez(path, **flat)
    return path


@pytest.mark.parametrize("problem,expect", [
    ("missing", "missing key 'final_conv/conv/bias'"),
    ("unexpected", "unexpected key 'extra/kernel'"),
    ("misshaped", "key 'final_conv/conv/bias' has shape (7,), the config needs"),
])
def test_bad_npz_exits_2_naming_file_and_key(tmp_path, tiny_npz, capsys, problem, expect):
    unet, head = tiny_npz
    flat = npz_lib.read_npz(unet)
    if problem == "missing":
        del flat["final_conv/conv/bias"]
    elif problem == "unexpected":
        flat["extra/kernel"] = np.zeros((2, 2), np.float32)
    else:
        flat["final_conv/conv/bias"] = np.zeros((7,), np.float32)
    bad = _bad_npz(tmp_path / "bad.npz", flat)
    rc, out = _run(capsys, "--unet", bad, "--head", head, "--config", TINY, "--out", tmp_path / "b")
    assert rc == 2
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and f"{bad}: does not fit the unet" in lines[0] and expect in lines[0], out.err
    assert not (tmp_path / "b").exists()


def test_unreadable_missing_and_swapped_files(tmp_path, tiny_npz, capsys):
    unet, head = tiny_npz
    junk = tmp_path / "junk.npz"
    junk.write_text("not a zip\n")
    for args, expect in [
        (("--unet", junk, "--head", head), f"{junk}: not a readable npz file"),
        (("--unet", tmp_path / "nope.npz", "--head", head), f"{tmp_path / 'nope.npz'}: no such file"),
        (("--unet", head, "--head", unet), f"{head}: does not fit the unet"),
        (("--params", unet), f"{unet}: a whole-model npz needs every key under unet/ or head/"),
        (("--unet", unet), "give a UNet npz and a head npz"),
    ]:
        rc, out = _run(capsys, *args, "--config", TINY, "--out", tmp_path / "b")
        assert rc == 2 and expect in out.err, (args, out.err)
        assert not (tmp_path / "b").exists()


def test_default_model_is_the_width_32_roadscene_model():
    """Cheap: reads the shipped bundle's config and marker, loads nothing."""
    path = checkpoints.DEFAULT_BUNDLE
    meta = bundle_lib.read_meta(path)
    config = bundle_lib.config_from_json((path / bundle_lib.CONFIG_FILE).read_text())
    assert config.model.unet.inner_channels == 32
    assert tuple(config.model.unet.channel_mults) == (1, 2, 4, 8, 8)
    assert meta["params"] == 24_473_315 + 531_374, "the 1/4-width UNet plus the fusion head"
    assert "dmfuse_jax_roadscene" in meta["source"]
    assert bundle_lib.folder_bytes(path) < 55 * 2**20, "package assets must stay under ~55 MB"
    assert not bundle_lib.is_bundle(ROOT / "dmfuse_jax" / "assets" / "quickstart_bundle")


@pytest.mark.slow
def test_real_npz_files_bundle_and_default_bundle(tmp_path, quarter_config, capsys):
    """The real files: a float32 bundle made by convert-npz fuses as the float32 Fuser built from the
    npz files (<= 1e-6); the shipped float16 default bundle stays within 1e-3 (float16 storage of the
    float16 UNet file is exact, the float32 head is rounded)."""
    if not UNET_NPZ.is_file():
        pytest.skip(f"{UNET_NPZ} not available")
    rc, out = _run(capsys, "--unet", UNET_NPZ, "--head", HEAD_NPZ, "--config", ROOT / "configs" / "dmfuse_quarter.py",
                   "--out", tmp_path / "b32")
    assert rc == 0, out.err
    params = npz_lib.load_model(quarter_config, unet=str(UNET_NPZ), head=str(HEAD_NPZ))
    ir, vi = _crop("07", (0, 128, 0, 128))
    want = Fuser(config=quarter_config, params=params)(ir, vi)
    diff32 = np.abs(load(str(tmp_path / "b32"))(ir, vi) - want).max()
    assert diff32 <= 1e-6, f"float32 bundle from the real npz differs by {diff32}"
    got = load(None)(ir, vi)
    assert np.abs(got - want).max() < 1e-3
    assert 10 * np.log10(1 / np.mean((got - want) ** 2)) > 70
