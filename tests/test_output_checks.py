"""Outputs that cannot be written fail first: `dmfuse fuse/export/convert-torch/evaluate/train` exit
with code 2 and one line naming the path, before any model is loaded or any work is done. The model
loaders and the scoring are replaced by functions that fail the test if reached.

Tests run as root, which may write anywhere permissions allow: "not writable" is a path under a
regular file, or under /proc, where nobody can create anything."""
from __future__ import annotations

import pytest

from conftest import ROOT
from dmfuse_jax.cli import main
from dmfuse_jax.data.images import check_output_path
from dmfuse_jax.errors import UserError

SAMPLES = ROOT / "samples"


@pytest.fixture
def a_file(tmp_path):
    f = tmp_path / "a_file.txt"
    f.write_text("a regular file\n")
    return f


@pytest.fixture
def no_work(monkeypatch):
    """Model loading and scoring fail the test if reached: the output check must come first."""
    def reached(*a, **k):
        raise AssertionError("reached the work before checking the output")
    import dmfuse_jax.commands.evaluate as evaluate_cli
    import dmfuse_jax.inference.checkpoints as checkpoints
    import dmfuse_jax.training.train as train

    monkeypatch.setattr(checkpoints, "resolve", reached)
    monkeypatch.setattr(checkpoints, "load_torch_pair", reached)
    monkeypatch.setattr(evaluate_cli, "_score_all", reached)
    monkeypatch.setattr(train, "initialize_distributed", reached)
    monkeypatch.setattr(train, "build_stage", reached)


def _one_line_error(capsys, argv, *expected):
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, f"rc={rc}, stderr:\n{err}"
    for text in expected:
        assert str(text) in lines[0], f"{text!r} not in {lines[0]!r}"
    return lines[0]


def test_check_output_path_cases(tmp_path, a_file):
    with pytest.raises(UserError, match=f"{a_file} is a file, not a folder"):
        check_output_path(a_file / "sub" / "x.png", "--out")
    with pytest.raises(UserError, match="/proc is not writable"):
        check_output_path("/proc/dmfuse_out/x.csv", "--csv")
    with pytest.raises(UserError, match="--out is a file, expected a folder"):
        check_output_path(a_file, "--out", folder=True)
    with pytest.raises(UserError, match="--csv is a folder, expected a file name"):
        check_output_path(tmp_path, "--csv")
    before = sorted(tmp_path.rglob("*"))
    check_output_path(tmp_path / "new" / "deeper", "--out", folder=True)
    check_output_path(tmp_path / "new" / "scores.csv", "--csv")
    assert sorted(tmp_path.rglob("*")) == before, "the check must create nothing"


def test_fuse_out_under_a_file(capsys, a_file, no_work):
    _one_line_error(capsys, ["fuse", "--ir", SAMPLES / "ir", "--vis", SAMPLES / "vi", "--out", a_file / "fused"],
                    "dmfuse fuse: error:", f"{a_file} is a file, not a folder")


def test_fuse_single_pair_out_under_proc(capsys, no_work):
    _one_line_error(capsys, ["fuse", "--ir", SAMPLES / "ir" / "07.png", "--vis", SAMPLES / "vi" / "07.png",
                             "--out", "/proc/dmfuse_out/07.png"], "cannot create --out", "/proc is not writable")


def test_export_out_unwritable_or_existing(capsys, tmp_path, a_file, no_work):
    args = ["export", "--checkpoint", tmp_path, "--out"]
    _one_line_error(capsys, args + [a_file / "bundle"], f"{a_file} is a file, not a folder")
    _one_line_error(capsys, args + ["/proc/dmfuse_bundle"], "/proc is not writable")
    _one_line_error(capsys, args + [tmp_path], "already exists (pass --overwrite")


def test_convert_torch_out_under_a_file(capsys, a_file, no_work):
    _one_line_error(capsys, ["convert-torch", "--unet", "u.pth", "--head", "h.pth", "--config",
                             ROOT / "configs" / "tiny.py", "--out", a_file / "bundle"], f"{a_file} is a file")


@pytest.mark.parametrize("flag", ["--csv", "--markdown", "--plot"])
def test_evaluate_outputs_unwritable(capsys, tmp_path, a_file, no_work, flag):
    outputs = {"--csv": tmp_path / "s.csv", flag: a_file / "out" / "x"}
    args = ["evaluate", "--ir", SAMPLES / "ir", "--vis", SAMPLES / "vi", "--fused", SAMPLES / "vi"]
    _one_line_error(capsys, args + [x for kv in outputs.items() for x in kv], f"cannot create {flag}")
    assert not (tmp_path / "s.csv").exists()


def test_train_workdir_unwritable(capsys, a_file, no_work):
    for workdir in (a_file / "run", "/proc/dmfuse_run"):
        _one_line_error(capsys, ["train", "--config", ROOT / "configs" / "quickstart_pretrain.py",
                                 "--workdir", workdir], "cannot create --workdir")
