"""`dmfuse fuse` end to end (in-process): folders of mixed sizes compile once per shape bucket,
batching does not change results, colour visible images come out RGB with their chroma, 16-bit
TIFFs, seeds, --resize, --method. Tiny config with random params, small crops of real images."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import DATA

from dmfuse_jax.cli import main
from dmfuse_jax.data.images import read_image, rgb_to_ycbcr
from dmfuse_jax.inference import bundle as bundle_lib
from dmfuse_jax.inference import fuser as fuser_mod
from dmfuse_jax.inference.fuser import Fuser, random_params


@pytest.fixture(scope="module")
def tiny_params(tiny_config):
    return random_params(tiny_config, seed=0)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_config, tiny_params):
    return bundle_lib.save_bundle(tmp_path_factory.mktemp("b") / "tiny", tiny_config, tiny_params)


@pytest.fixture(scope="module")
def fuser(tiny_config, tiny_params):
    return Fuser(config=tiny_config, params=tiny_params)


def _save(path, x01):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.rint(np.asarray(x01) * 255).astype(np.uint8)
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(path)
    return path


def _png(path):
    return np.asarray(Image.open(path)).astype(np.float32) / 255.0


def _tno(name, box):
    y0, y1, x0, x1 = box
    return (read_image(DATA / "tno" / "ir" / f"{name}.png")[y0:y1, x0:x1],
            read_image(DATA / "tno" / "vi" / f"{name}.png")[y0:y1, x0:x1])


def test_mixed_size_folder_compiles_once_per_bucket_and_batching_keeps_results(tmp_path, bundle, fuser, capsys):
    # 3 pairs in the 64x64 bucket (3 sizes), 1 in the 64x128 bucket; batch size 2.
    boxes = {"a": (0, 50, 0, 60), "b": (60, 124, 60, 124), "c": (130, 170, 10, 60), "d": (0, 60, 100, 200)}
    for name, box in boxes.items():
        ir, vi = _tno("07", box)
        _save(tmp_path / "ir" / f"{name}.png", ir)
        _save(tmp_path / "vi" / f"{name}.png", vi)
    new_shapes = {(2, 64, 64), (1, 64, 128)} - {k[1:] for k in fuser_mod._EXECUTABLES if k[0] == fuser._key}
    traces = fuser_mod.TRACE_COUNT[0]
    rc = main(["fuse", "--checkpoint", str(bundle), "--ir", str(tmp_path / "ir"), "--vis", str(tmp_path / "vi"),
               "--out", str(tmp_path / "out"), "--batch-size", "2", "--no-progress"])
    assert rc == 0
    assert fuser_mod.TRACE_COUNT[0] - traces == len(new_shapes), "one trace (= compile) per new bucket shape"
    out = capsys.readouterr().out
    assert "2 shape bucket(s)" in out and "pairs/s" in out and "ms/pair" in out
    for name, (y0, y1, x0, x1) in boxes.items():
        got = _png(tmp_path / "out" / f"{name}.png")
        assert got.shape == (y1 - y0, x1 - x0)
        ir, vi = read_image(tmp_path / "ir" / f"{name}.png"), read_image(tmp_path / "vi" / f"{name}.png")
        want = np.rint(fuser(ir, vi) * 255) / 255  # alone, batch 1: same bucket, same noise
        assert np.abs(got - want).max() <= 1.01 / 255, name
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.png", "c.png", "d.png"]


def test_single_colour_pair_gives_rgb_png_with_visible_chroma(tmp_path, bundle):
    vis = read_image(sorted((DATA / "roadscene" / "vi").iterdir())[0])[100:150, 200:260]
    ir = read_image(sorted((DATA / "roadscene" / "ir").iterdir())[0])[100:150, 200:260]
    _save(tmp_path / "ir.png", ir)
    _save(tmp_path / "vis.png", vis)
    out = tmp_path / "res" / "fused.png"
    assert main(["fuse", "--checkpoint", str(bundle), "--ir", str(tmp_path / "ir.png"),
                 "--vis", str(tmp_path / "vis.png"), "--out", str(out), "--no-progress"]) == 0
    got = _png(out)
    assert got.shape == vis.shape
    src = read_image(tmp_path / "vis.png")
    inside = np.all((got > 0.02) & (got < 0.98), axis=-1)
    assert np.abs(rgb_to_ycbcr(got)[inside][:, 1:] - rgb_to_ycbcr(src)[inside][:, 1:]).mean() < 2 / 255


def test_sixteen_bit_tiff_infrared(tmp_path, bundle, fuser):
    ir, vi = _tno("07", (96, 150, 100, 156))
    raw = (21000 + 4000 * ir[..., 0]).astype(np.uint16)
    Image.fromarray(raw).save(tmp_path / "ir.tif")
    assert Image.open(tmp_path / "ir.tif").mode.startswith("I;16")
    _save(tmp_path / "vi.png", vi)
    vi8 = read_image(tmp_path / "vi.png")
    outs = {}
    for mapping in ("minmax", "full"):
        outs[mapping] = tmp_path / f"{mapping}.png"
        assert main(["fuse", "--checkpoint", str(bundle), "--ir", str(tmp_path / "ir.tif"), "--vis",
                     str(tmp_path / "vi.png"), "--out", str(outs[mapping]), "--sixteen-bit", mapping,
                     "--no-progress"]) == 0
    stretched = ((raw - raw.min()) / float(raw.max() - raw.min())).astype(np.float32)
    want = np.rint(fuser(stretched, vi8) * 255) / 255
    assert np.abs(_png(outs["minmax"]) - want).max() <= 1.01 / 255
    assert np.abs(_png(outs["full"]) - _png(outs["minmax"])).max() > 2 / 255  # the mapping is applied


def test_seed_and_resize_options(tmp_path, bundle):
    ir, vi = _tno("07", (96, 150, 100, 156))
    _save(tmp_path / "ir.png", ir[::2, ::2])  # half size: needs --resize
    _save(tmp_path / "vi.png", vi)
    args = ["fuse", "--checkpoint", str(bundle), "--ir", str(tmp_path / "ir.png"), "--vis", str(tmp_path / "vi.png"),
            "--resize", "--no-progress"]
    assert main(args + ["--out", str(tmp_path / "s0.png")]) == 0
    assert main(args + ["--out", str(tmp_path / "s0b.png")]) == 0
    assert main(args + ["--out", str(tmp_path / "s1.png"), "--seed", "1"]) == 0
    s0, s0b, s1 = (_png(tmp_path / f) for f in ("s0.png", "s0b.png", "s1.png"))
    assert s0.shape == vi.shape[:2]
    np.testing.assert_array_equal(s0, s0b)
    assert np.abs(s0 - s1).max() > 0


def test_method_baseline_uses_the_colour_route(tmp_path):
    vis = read_image(sorted((DATA / "roadscene" / "vi").iterdir())[0])[100:150, 200:260]
    ir = read_image(sorted((DATA / "roadscene" / "ir").iterdir())[0])[100:150, 200:260]
    _save(tmp_path / "ir" / "x.png", ir)
    _save(tmp_path / "vi" / "x.png", vis)
    assert main(["fuse", "--method", "average", "--ir", str(tmp_path / "ir"), "--vis", str(tmp_path / "vi"),
                 "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    got = _png(tmp_path / "out" / "x.png")
    src_ir, src_vis = read_image(tmp_path / "ir" / "x.png"), read_image(tmp_path / "vi" / "x.png")
    y_want = 0.5 * (src_ir[..., 0] + rgb_to_ycbcr(src_vis)[..., 0])
    inside = np.all((got > 0.02) & (got < 0.98), axis=-1)
    assert np.abs(rgb_to_ycbcr(got)[..., 0][inside] - y_want[inside]).max() < 3 / 255


@pytest.mark.slow
def test_readme_main_job_on_samples_with_a_default_bundle(tmp_path, bundle, monkeypatch, capsys):
    from conftest import ROOT
    from dmfuse_jax.inference import checkpoints

    monkeypatch.setattr(checkpoints, "DEFAULT_BUNDLE", bundle)
    assert main(["fuse", "--ir", str(ROOT / "samples" / "ir"), "--vis", str(ROOT / "samples" / "vi"),
                 "--out", str(tmp_path / "fused")]) == 0
    assert sorted(p.name for p in (tmp_path / "fused").iterdir()) == ["07.png", "19.png", "20.png"]
    assert "pairs/s" in capsys.readouterr().out
