"""`dmfuse evaluate` end to end on small TNO crops, and its errors on bad input (exit code 2)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from dmfuse_jax.cli import main
from dmfuse_jax.data.images import read_image, write_image_atomic
from dmfuse_jax.evaluation.baselines import BASELINES
from dmfuse_jax.evaluation.metrics import METRICS

from conftest import DATA

STEMS = ("01", "07", "19")
CROP = (slice(40, 232), slice(60, 252))  # 192x192: large enough for 5-scale MS-SSIM


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """ir/, vi/ with 3 cropped TNO pairs (one visible stored as JPEG) and fused/average, fused/max."""
    root = tmp_path_factory.mktemp("eval")
    for stem in STEMS:
        ir = read_image(DATA / "tno" / "ir" / f"{stem}.png")[CROP][..., 0]
        vis = read_image(DATA / "tno" / "vi" / f"{stem}.png")[CROP][..., 0]
        write_image_atomic(root / "ir" / f"{stem}.png", ir)
        write_image_atomic(root / "vi" / f"{stem}{'.jpg' if stem == '07' else '.png'}", vis)
        for name in ("average", "max"):
            write_image_atomic(root / "fused" / name / f"{stem}.png", BASELINES[name](ir, vis))
    return root


def _args(root: Path, out: Path, *extra: str, fused=("average", "max")) -> list[str]:
    args = ["evaluate", "--ir", str(root / "ir"), "--vis", str(root / "vi"), "--csv", str(out / "m.csv")]
    for f in fused:
        args += ["--fused", str(root / "fused" / f)]
    return args + list(extra)


def test_end_to_end_writes_csv_markdown_and_plots(folders, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(_args(folders, out, "--markdown", str(out / "t.md"), "--plot", str(out / "radar.png"),
                    "--workers", "1"))
    assert rc == 0
    with open(out / "m.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["method", "image", *METRICS, "convention", "color"]
    assert {(r["convention"], r["color"]) for r in rows} == {("vifb", "per-channel")}
    assert [(r["method"], r["image"]) for r in rows] == [(m, s) for m in ("average", "max") for s in STEMS]
    values = np.array([[float(r[m]) for m in METRICS] for r in rows])
    assert np.isfinite(values).all()
    md = (out / "t.md").read_text()
    assert md.startswith("| metric | average | max |") and md.count("\n") == len(METRICS) + 4
    assert md.endswith("Scored with convention: vifb, color: per-channel.\n")
    for png in (out / "radar.png", out / "radar_bars.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "scored 3 pair(s) x 2 method(s) x 21 metric(s)" in printed and "s wall" in printed
    assert "convention: vifb, colour: per-channel" in printed
    # the means in the markdown are the CSV's means
    en_avg = np.mean([float(r["EN"]) for r in rows if r["method"] == "average"])
    assert f"{en_avg:.4f}" in md


def test_metric_subset_with_worker_pool_gives_the_same_numbers(folders, tmp_path):
    out1, out2 = tmp_path / "a", tmp_path / "b"
    assert main(_args(folders, out1, "--metrics", "EN,Qabf,MI", "--workers", "1")) == 0
    assert main(_args(folders, out2, "--metrics", "EN,Qabf,MI", "--workers", "2")) == 0
    text1, text2 = (out1 / "m.csv").read_text(), (out2 / "m.csv").read_text()
    assert text1.splitlines()[0] == "method,image,EN,Qabf,MI,convention,color"
    assert text1 == text2


def _expect_error(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err
    for n in needles:
        assert n in err, f"{n!r} not in error message {err!r}"
    return err


def test_unknown_metric_is_rejected(folders, tmp_path, capsys):
    _expect_error(capsys, _args(folders, tmp_path, "--metrics", "EN,BOGUS"), "BOGUS")
    assert not (tmp_path / "m.csv").exists()


def test_size_mismatch_names_the_fused_file(folders, tmp_path, capsys):
    bad = tmp_path / "fused" / "small"
    for stem in STEMS:
        write_image_atomic(bad / f"{stem}.png", np.zeros((50, 60), np.float32))
    root = tmp_path
    for d in ("ir", "vi"):
        (root / d).symlink_to(folders / d)
    _expect_error(capsys, _args(root, tmp_path, fused=("small",)), str(bad / "01.png"), "differs")
    assert not (tmp_path / "m.csv").exists()


def test_missing_fused_image_names_the_pair(folders, tmp_path, capsys):
    part = tmp_path / "fused" / "partial"
    write_image_atomic(part / "01.png", np.zeros((192, 192), np.float32))
    for d in ("ir", "vi"):
        (tmp_path / d).symlink_to(folders / d)
    _expect_error(capsys, _args(tmp_path, tmp_path, fused=("partial",)), "missing fused image", "'07'")


def test_missing_source_pair_is_reported(folders, tmp_path, capsys):
    (tmp_path / "ir").mkdir()
    for stem in STEMS[:2]:
        (tmp_path / "ir" / f"{stem}.png").symlink_to(folders / "ir" / f"{stem}.png")
    (tmp_path / "vi").symlink_to(folders / "vi")
    (tmp_path / "fused").symlink_to(folders / "fused")
    _expect_error(capsys, _args(tmp_path, tmp_path), "unmatched", "19")


def test_non_image_file_is_named(folders, tmp_path, capsys):
    junk = tmp_path / "fused" / "junk"
    junk.mkdir(parents=True)
    for stem in STEMS:
        (junk / f"{stem}.png").write_bytes(b"this is not a png")
    for d in ("ir", "vi"):
        (tmp_path / d).symlink_to(folders / d)
    _expect_error(capsys, _args(tmp_path, tmp_path, fused=("junk",)), str(junk / "01.png"), "not a readable image")


def test_two_fused_folders_with_the_same_name_are_rejected(folders, tmp_path, capsys):
    other = tmp_path / "x" / "average"
    for stem in STEMS:
        write_image_atomic(other / f"{stem}.png", np.zeros((192, 192), np.float32))
    argv = _args(folders, tmp_path) + ["--fused", str(other)]
    _expect_error(capsys, argv, "both named 'average'")


def test_image_too_small_for_ms_ssim_names_the_file(tmp_path, capsys):
    for d in ("ir", "vi", "fused/tiny"):
        write_image_atomic(tmp_path / d / "a.png", np.random.default_rng(0).random((64, 64)))
    argv = _args(tmp_path, tmp_path, "--metrics", "EN,MS_SSIM", "--workers", "1", fused=("tiny",))
    _expect_error(capsys, argv, str(tmp_path / "fused" / "tiny" / "a.png"), "176")


def test_convention_changes_only_the_metrics_where_vifb_departs_from_the_textbook(folders, tmp_path):
    names = "EN,Qabf,SSIM,MI,PSNR,RMSE"
    out_v, out_s = tmp_path / "v", tmp_path / "s"
    assert main(_args(folders, out_v, "--metrics", names, "--workers", "1")) == 0
    assert main(_args(folders, out_s, "--metrics", names, "--workers", "1", "--convention", "standard")) == 0
    read = lambda d: list(csv.DictReader(open(d / "m.csv", newline="")))  # noqa: E731
    vifb, std = read(out_v), read(out_s)
    assert {r["convention"] for r in std} == {"standard"} and {r["color"] for r in std} == {"luminance"}
    for rv, rs in zip(vifb, std):
        assert rv["EN"] == rs["EN"] and rv["Qabf"] == rs["Qabf"]  # shared definitions
        assert float(rv["SSIM"]) == pytest.approx(2 * float(rs["SSIM"]), rel=1e-12)  # sum vs mean
        # 192x192 images: VIFB's helper is sqrt(sum d^2) / N = RMSE / sqrt(N), N = 192 * 192
        assert float(rv["RMSE"]) < float(rs["RMSE"]) / 100
        assert float(rv["PSNR"]) > float(rs["PSNR"]) + 20


def test_one_method_plot_falls_back_to_bars_and_a_reference_csv_restores_the_radar(folders, tmp_path, capsys):
    from PIL import Image

    ref = tmp_path / "ref"
    assert main(_args(folders, ref, "--metrics", "EN,SD,Qabf", "--workers", "1", fused=("average",))) == 0
    out = tmp_path / "one"
    argv = _args(folders, out, "--metrics", "EN,SD,Qabf", "--workers", "1", "--plot", str(out / "p.png"),
                 fused=("max",))
    assert main(argv) == 0
    assert "bar chart in place of the radar" in capsys.readouterr().out
    assert (out / "p.png").read_bytes() == (out / "p_bars.png").read_bytes()
    assert main(argv + ["--reference", str(ref / "m.csv")]) == 0
    assert "in place of the radar" not in capsys.readouterr().out
    w, h = Image.open(out / "p.png").size
    assert abs(w - h) < 0.25 * w  # the square polar figure, not the 3-panel bar strip
    # a reference scored under another convention is refused before any scoring
    _expect_error(capsys, argv + ["--convention", "standard", "--reference", str(ref / "m.csv")],
                  str(ref / "m.csv"), "convention vifb, color per-channel", "--convention standard --color luminance")
