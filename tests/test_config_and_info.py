"""Config loading and overrides; the `dmfuse` entry point and `dmfuse info`."""
from __future__ import annotations

import pytest

from conftest import ROOT
from dmfuse_jax.cli import main
from dmfuse_jax.config_lib import load_config
from dmfuse_jax.errors import UserError


def test_overrides_keep_types():
    cfg = load_config(str(ROOT / "configs/tiny.py"),
                      ["--config.model.unet.inner_channels=16", "model.unet.channel_mults=[1,2,2]",
                       "model.unet.dropout=0", "seed=3", "model.input_range=0_1"])
    assert cfg.model.unet.inner_channels == 16
    assert cfg.model.unet.channel_mults == (1, 2, 2)
    assert cfg.model.unet.dropout == 0.0 and isinstance(cfg.model.unet.dropout, float)
    assert cfg.seed == 3 and cfg.model.input_range == "0_1"


def test_config_errors_name_the_problem(tmp_path):
    with pytest.raises(UserError, match="no key 'model.unet.widht'"):
        load_config(str(ROOT / "configs/tiny.py"), ["model.unet.widht=3"])
    with pytest.raises(UserError, match="config file not found"):
        load_config(str(tmp_path / "nope.py"))
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config():\n    raise RuntimeError('broken on purpose')\n")
    with pytest.raises(UserError, match="bad.py.*broken on purpose"):
        load_config(str(bad))


def test_unknown_command_exits_2(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_info_prints_counts(capsys):
    assert main(["info", "--config", str(ROOT / "configs/tiny.py"), "--size", "64"]) == 0
    out = capsys.readouterr().out
    assert "UNet parameters:        1,475,867" in out
    assert "GFLOP" in out and "fusion head parameters" in out


def test_info_of_the_paper_model(capsys):
    """The 1/4 model: 24,473,315 UNet params (the authors' count), 90.1 GFLOP at 256x256 (DESIGN.md,
    measured from the authors' model): the analytic count must reproduce it."""
    assert main(["info", "--config", str(ROOT / "configs/dmfuse_quarter.py")]) == 0
    out = capsys.readouterr().out
    assert "UNet parameters:        24,473,315" in out
    gflop = float(out.split("UNet forward, 1x256x256: ")[1].split(" GFLOP")[0])
    assert gflop == 90.1, gflop


def test_info_with_a_missing_config_exits_2(capsys):
    assert main(["info", "--config", "configs/does_not_exist.py"]) == 2
    assert "config file not found" in capsys.readouterr().err
