"""Bad input to `dmfuse fuse`: each case exits with code 2, names the file and the problem, and
leaves no output file. All are caught before the model runs (no compilation here)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT

from dmfuse_jax.cli import main
from dmfuse_jax.inference import bundle as bundle_lib
from dmfuse_jax.inference.fuser import random_params


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_config):
    return bundle_lib.save_bundle(tmp_path_factory.mktemp("b") / "tiny", tiny_config, random_params(tiny_config))


def _img(path, shape=(40, 48), mode="L", seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if mode == "L":
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
    else:
        Image.fromarray(rng.integers(0, 256, shape + (len(mode),), dtype=np.uint8), mode=mode).save(path)
    return path


def _fuse(capsys, *args):
    capsys.readouterr()
    rc = main(["fuse", "--no-progress", *map(str, args)])
    return rc, capsys.readouterr().err


def _no_output(out):
    assert not out.exists() or not any(out.rglob("*")), f"output left behind: {list(out.rglob('*'))}"


def test_missing_file(tmp_path, bundle, capsys):
    vis = _img(tmp_path / "vis.png")
    out = tmp_path / "out"
    rc, err = _fuse(capsys, "--checkpoint", bundle, "--ir", tmp_path / "nope.png", "--vis", vis, "--out", out / "f.png")
    assert rc == 2 and f"{tmp_path / 'nope.png'}: no such file" in err
    _no_output(out)


def test_non_image_file(tmp_path, bundle, capsys):
    ir = tmp_path / "ir.png"
    ir.write_text("this is not a PNG\n")
    vis = _img(tmp_path / "vis.png")
    out = tmp_path / "out"
    rc, err = _fuse(capsys, "--checkpoint", bundle, "--ir", ir, "--vis", vis, "--out", out / "f.png")
    assert rc == 2 and f"{ir}: not a readable image" in err
    _no_output(out)


def test_truncated_image_fails_at_read_naming_it_and_writes_no_partial_file(tmp_path, bundle, capsys):
    full = _img(tmp_path / "full.png", (64, 64))
    ir = tmp_path / "ir.png"
    ir.write_bytes(full.read_bytes()[:200])  # valid header, truncated data
    vis = _img(tmp_path / "vis.png", (64, 64))
    out = tmp_path / "out"
    rc, err = _fuse(capsys, "--checkpoint", bundle, "--ir", ir, "--vis", vis, "--out", out / "f.png")
    assert rc == 2 and str(ir) in err
    _no_output(out)


def test_empty_folder(tmp_path, bundle, capsys):
    (tmp_path / "ir").mkdir()
    _img(tmp_path / "vi" / "a.png")
    out = tmp_path / "out"
    rc, err = _fuse(capsys, "--checkpoint", bundle, "--ir", tmp_path / "ir", "--vis", tmp_path / "vi", "--out", out)
    assert rc == 2 and f"{tmp_path / 'ir'}: no images found" in err
    _no_output(out)


def test_unmatched_names(tmp_path, bundle, capsys):
    for n in ("a", "b"):
        _img(tmp_path / "ir" / f"{n}.png")
    for n in ("a", "c"):
        _img(tmp_path / "vi" / f"{n}.png")
    out = tmp_path / "out"
    rc, err = _fuse(capsys, "--checkpoint", bundle, "--ir", tmp_path / "ir", "--vis", tmp_path / "vi", "--out", out)
    assert rc == 2 and "unmatched image names" in err and "only in infrared folder" in err and ": b" in err
    assert "only in visible folder" in err and ": c" in err
    _no_output(out)


def test_size_mismatch_is_an_error_without_resize(tmp_path, bundle, capsys):
    _img(tmp_path / "ir" / "a.png", (40, 48))
    _img(tmp_path / "vi" / "a.png", (40, 50))
    out = tmp_path / "out"
    rc, err = _fuse(capsys, "--checkpoint", bundle, "--ir", tmp_path / "ir", "--vis", tmp_path / "vi", "--out", out)
    assert rc == 2 and f"{tmp_path / 'ir' / 'a.png'}: size 48x40 differs from" in err and "--resize" in err
    _no_output(out)


def test_channel_counts_alpha_is_composited_two_channel_array_is_refused(tmp_path, capsys):
    _img(tmp_path / "ir" / "a.png", (40, 48), mode="LA")      # grey + alpha: composited on black
    _img(tmp_path / "vi" / "a.png", (40, 48), mode="RGBA")    # colour + alpha: composited on black
    out = tmp_path / "out"
    rc, err = _fuse(capsys, "--method", "max", "--ir", tmp_path / "ir", "--vis", tmp_path / "vi", "--out", out)
    assert rc == 0, err
    got = Image.open(out / "a.png")
    assert got.mode == "RGB" and got.size == (48, 40)
    from dmfuse_jax.inference.colour import FuseInputError
    from dmfuse_jax.inference.fuser import MethodFuser
    with pytest.raises(FuseInputError, match=r"ir: unsupported image shape \(40, 48, 2\)"):
        MethodFuser(method="max")(np.zeros((40, 48, 2), np.uint8), np.zeros((40, 48), np.uint8))


def test_checkpoint_of_another_config(tmp_path, bundle, tiny_config, quarter_config, capsys):
    _img(tmp_path / "ir.png")
    _img(tmp_path / "vis.png")
    out = tmp_path / "out"
    rc, err = _fuse(capsys, "--checkpoint", bundle, "--config", ROOT / "configs" / "dmfuse_quarter.py",
                    "--ir", tmp_path / "ir.png", "--vis", tmp_path / "vis.png", "--out", out / "f.png")
    assert rc == 2 and f"{bundle}: checkpoint does not fit the given --config" in err and "mis-shaped" in err
    # a bundle whose params belong to another config than its own config.json
    odd = bundle_lib.save_bundle(tmp_path / "odd", quarter_config, random_params(tiny_config), store_dtype="bfloat16")
    rc, err = _fuse(capsys, "--checkpoint", odd, "--ir", tmp_path / "ir.png", "--vis", tmp_path / "vis.png",
                    "--out", out / "f.png")
    assert rc == 2 and f"{odd}: checkpoint does not fit its own config" in err
    _no_output(out)


def test_not_a_checkpoint_wrong_output_name_and_output_over_inputs(tmp_path, bundle, capsys):
    ir, vis = _img(tmp_path / "ir.png"), _img(tmp_path / "vis.png")
    out = tmp_path / "out"
    rc, err = _fuse(capsys, "--checkpoint", tmp_path, "--ir", ir, "--vis", vis, "--out", out / "f.png")
    assert rc == 2 and f"{tmp_path}: not a checkpoint" in err
    rc, err = _fuse(capsys, "--checkpoint", bundle, "--ir", ir, "--vis", vis, "--out", out / "f.jpg")
    assert rc == 2 and "f.jpg: the output is an 8-bit PNG" in err
    _img(tmp_path / "d" / "ir" / "a.png")
    _img(tmp_path / "d" / "vi" / "a.png")
    rc, err = _fuse(capsys, "--checkpoint", bundle, "--ir", tmp_path / "d" / "ir", "--vis", tmp_path / "d" / "vi",
                    "--out", tmp_path / "d" / "vi")
    assert rc == 2 and "must not be an input folder" in err
    _no_output(out)
