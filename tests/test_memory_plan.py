"""Fusing in less memory and planning it: the UNet passes in sequence give today's result, the memory
plan picks the batch and passes that fit (reusing the executables it compiled), and when nothing
fits `dmfuse fuse` and the Python API stop with one line before any image is fused; `--plan` prints
the plan and writes nothing. Tiny config, random params, small crops of a real pair."""
from __future__ import annotations

import re

import jax
import numpy as np
import pytest

from conftest import DATA

from dmfuse_jax.cli import main
from dmfuse_jax.data.images import read_image
from dmfuse_jax.errors import UserError
from dmfuse_jax.inference import bundle as bundle_lib
from dmfuse_jax.inference import fuser as fuser_mod
from dmfuse_jax.inference import memory
from dmfuse_jax.inference.fuser import Fuser, random_params
from dmfuse_jax.models import build_dmfuse
from dmfuse_jax.models.dmfuse import fuse_in_sequence


@pytest.fixture(scope="module")
def tiny_params(tiny_config):
    return random_params(tiny_config, seed=0)


def _pair(h, w):
    return (read_image(DATA / "tno" / "ir" / "07.png")[:h, :w, :1],
            read_image(DATA / "tno" / "vi" / "07.png")[:h, :w, :1])


def test_passes_in_sequence_equal_the_batched_forward(tiny_config, tiny_params):
    """fuse_in_sequence (one UNet pass at a time, the reducer's conv summed per timestep) is the
    model's own forward on the same noise: odd size (padded to the stride), batch 2."""
    model = build_dmfuse(tiny_config)
    k1, k2 = jax.random.split(jax.random.PRNGKey(3))
    ir = jax.random.uniform(k1, (2, 24, 40, 1)) * 2 - 1
    vi = jax.random.uniform(k2, (2, 24, 40, 1)) * 2 - 1
    key = jax.random.PRNGKey(0)
    want = jax.jit(lambda p: model.apply({"params": p}, ir, vi, rngs={"noise": key}))(tiny_params)
    got = jax.jit(lambda p: fuse_in_sequence(model, p, ir, vi, key))(tiny_params)
    assert got.shape == want.shape == (2, 24, 40, 1)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert float(np.std(want)) > 0.05  # not a constant image


@pytest.fixture(autouse=True)
def _forget_plans():
    """Plans are cached per shape for the process: one planned under a patched free memory must not
    reach a later test (of this file or another, in any order)."""
    yield
    memory._PLANS.clear()


def _patch_free(monkeypatch, free):
    monkeypatch.setattr(memory, "available_bytes", lambda device=None: (free, "test RAM"))
    memory._PLANS.clear()


class _Analysis:
    def __init__(self, temp):
        self.temp_size_in_bytes, self.output_size_in_bytes, self.argument_size_in_bytes = temp, 0, 0
        self.alias_size_in_bytes = 0


def _stub_executables(monkeypatch, fuser, per_pixel):
    """fuser._executable(b, h, w, passes) -> an object whose memory_analysis says
    per_pixel[passes] * b * h * w bytes; records what was asked."""
    asked = []

    class Exe:
        def __init__(self, n):
            self.n = n

        def memory_analysis(self):
            return _Analysis(self.n)

    def fake(b, h, w, passes="batched"):
        asked.append((b, passes))
        return Exe(per_pixel[passes] * b * h * w)

    monkeypatch.setattr(fuser, "_executable", fake)
    return asked


@pytest.mark.parametrize("free_per_image_px,want", [(100, (4, "batched")), (10, (4, "sequential")),
                                                    (4, (2, "sequential")), (2, (1, "sequential"))],
                         ids=["batched", "sequential", "smaller-batch", "batch-1"])
def test_plan_takes_the_first_that_fits(tiny_config, tiny_params, monkeypatch, free_per_image_px, want):
    """Batched at the asked batch, else in sequence, else the largest batch in sequence that fits
    (needs stubbed: batched 20, sequential 6 bytes per pixel per image)."""
    fuser = Fuser(config=tiny_config, params=tiny_params, bucket=64)
    asked = _stub_executables(monkeypatch, fuser, {"batched": 20, "sequential": 6})
    _patch_free(monkeypatch, int(free_per_image_px * 4 * 64 * 64 / memory.HEADROOM))
    plan = fuser.memory_plan(4, 64, 64)
    assert plan.fits and (plan.batch, plan.passes) == want, (plan, asked)
    assert plan.needed == {"batched": 20, "sequential": 6}[want[1]] * want[0] * 64 * 64
    assert asked[-1] == want, "the executable planned last is not the one chosen"
    # above BATCHED_MAX_PIXELS 'auto' goes straight to the passes in sequence
    monkeypatch.setattr(memory, "BATCHED_MAX_PIXELS", 64 * 64 - 1)
    memory._PLANS.clear()
    asked.clear()
    fuser.memory_plan(4, 64, 64)
    assert asked[0] == (4, "sequential")


def test_nothing_fits_is_one_line_from_the_python_api(tiny_config, tiny_params, monkeypatch):
    fuser = Fuser(config=tiny_config, params=tiny_params, bucket=64)
    _stub_executables(monkeypatch, fuser, {"batched": 20, "sequential": 6})
    _patch_free(monkeypatch, int(0.8 * 6 * 64 * 128 / memory.HEADROOM))  # 0.8 of the image in sequence
    ir, vi = _pair(60, 100)
    with pytest.raises(UserError) as e:
        fuser(ir, vi)
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("100x60", "bucket 128x64", f"needs {6 * 64 * 128:,} bytes", "largest square that fits is about 64x64"):
        assert part in msg, f"{part!r} missing from: {msg}"
    memory._PLANS.clear()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_config, tiny_params):
    return bundle_lib.save_bundle(tmp_path_factory.mktemp("b") / "tiny", tiny_config, tiny_params)


def _write_pair(tmp_path, h, w):
    from PIL import Image

    ir, vi = _pair(h, w)
    for name, x in (("ir", ir), ("vi", vi)):
        (tmp_path / name).mkdir(exist_ok=True)
        Image.fromarray(np.rint(x[..., 0] * 255).astype(np.uint8)).save(tmp_path / name / "a.png")


def test_cli_plan_prints_and_writes_nothing_and_too_large_exits_2_before_fusing(tmp_path, bundle, monkeypatch, capsys):
    _write_pair(tmp_path, 60, 100)
    args = ["fuse", "--checkpoint", str(bundle), "--ir", str(tmp_path / "ir"), "--vis", str(tmp_path / "vi"),
            "--out", str(tmp_path / "out"), "--no-progress", "--bucket", "64"]
    memory._PLANS.clear()
    assert main(args + ["--plan"]) == 0
    out = capsys.readouterr().out
    assert "a.png" in out and "bucket 128x64" in out and "UNet passes" in out and "largest square" in out
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir()), "--plan wrote an image"
    # fusing after planning: the plan's compile time is inside the summary's total
    assert main(args[:-5] + ["--out", str(tmp_path / "fused"), "--no-progress", "--bucket", "64"]) == 0
    summary = capsys.readouterr().out
    total = float(re.search(r"fused 1 pair\(s\) in ([0-9.]+) s", summary).group(1))
    compile_s = float(re.search(r"phases: .*executables ([0-9.]+)", summary).group(1))
    assert (tmp_path / "fused" / "a.png").exists() and compile_s <= total, summary
    _patch_free(monkeypatch, 1000)
    traces = fuser_mod.TRACE_COUNT[0]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "too large for this machine" in err and "1,000 bytes" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir()), "an image was written"
    assert fuser_mod.TRACE_COUNT[0] == traces  # the executables were compiled by --plan, reused here
