"""Evaluation while training (`config.evals`, dmfuse_jax/training/evals.py) and the best checkpoint
(`config.checkpoint.best`, best.py), on the quickstart fusion config at the tiny test size, through
`dmfuse train` in subprocesses on 2 forced host devices (the batch and the evals' fuse split over the
mesh), sharing one compilation cache:

  evals   fusion_metrics every 2 steps on 2 small held-out pairs, best by raw Qabf, 4 steps, then
          resumed to 8 steps (evals at 2, 4, 6, 8);
  plain   the same 4 steps without evals: params bit-identical to `evals` at step 4.

The evals' values (2 devices) are checked against the metrics of what `dmfuse fuse` (1 device, the
Fuser) writes for the best step's params.
"""
from __future__ import annotations

import json
import struct
import subprocess
import sys

import numpy as np
import pytest

import helpers as T

METRICS = ("Qabf", "VIF", "SSIM", "MS_SSIM_MEF")
TIMEOUT = 600


def make_pairs(root):
    """2 held-out RoadScene pairs, centre crops of 48x56 (small: the test is about the mechanism; MS_SSIM_MEF
    needs 44 pixels a side)."""
    from dmfuse_jax.data.fusion_pairs import split_pairs
    from dmfuse_jax.data.images import read_image, write_image_atomic

    _, held = split_pairs(T.REPO_ROOT / "../shared/data/roadscene/ir", T.REPO_ROOT / "../shared/data/roadscene/vi", 2)
    for name, a, b in held:
        for path, part in ((a, "ir"), (b, "vi")):
            img = read_image(path)
            h, w = img.shape[:2]
            write_image_atomic(root / part / f"{name}.png", img[h // 2 - 24:h // 2 + 24, w // 2 - 28:w // 2 + 28])
    return root / "ir", root / "vi"


def evals_overrides(ir, vi, every=2):
    return [f"evals.holdout.every_steps={every}", "evals.holdout.pairs=folder", f"evals.holdout.ir_dir={ir}",
            f"evals.holdout.vi_dir={vi}", "evals.holdout.preview_size=32", "checkpoint.best.metric=eval/holdout/raw/Qabf",
            "checkpoint_every_steps=2"]


class Run:
    """A `dmfuse train` subprocess of the tiny fusion config; `wait()` -> self with returncode, stdout."""

    def __init__(self, workdir, extra, env):
        self.proc = subprocess.Popen(T.train_command("fusion", workdir, extra), env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, cwd=str(T.REPO_ROOT))

    def wait(self):
        self.stdout, self.stderr = self.proc.communicate(timeout=TIMEOUT)
        self.returncode = self.proc.returncode
        return self


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("evals")
    ir, vi = make_pairs(root / "pairs")
    env = T.subprocess_env(root / "xla_cache", xla_flags=T.FAST_COMPILE + " --xla_force_host_platform_device_count=2")
    # Side by side (the two CPU cores overlap one run's start-up with the other's compiles).
    procs = {
        "evals": Run(root / "evals", evals_overrides(ir, vi), env),
        "plain": Run(root / "plain", ["checkpoint_every_steps=2"], env),
    }
    procs = {k: p.wait() for k, p in procs.items()}
    procs["resumed"] = Run(root / "evals", evals_overrides(ir, vi) + ["total_steps=8"], env).wait()
    for name, p in procs.items():
        assert p.returncode == 0, f"run {name} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return dict(root=root, procs=procs, ir=ir, vi=vi, env=env)


def rows(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def eval_rows(workdir):
    return {r["step"]: r for r in rows(workdir) if any(k.startswith("eval/") for k in r)}


def tensorboard_tags(workdir) -> set[str]:
    """Every summary tag of the run's TensorBoard event files (TFRecord framing, tensorboardX protos)."""
    from tensorboardX.proto import event_pb2

    tags = set()
    for path in (workdir / "tensorboard").glob("events.out.tfevents.*"):
        data, i = path.read_bytes(), 0
        while i + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            ev = event_pb2.Event()
            ev.ParseFromString(data[i + 12:i + 12 + n])
            tags.update(v.tag for v in ev.summary.value)
            i += 12 + n + 4
    return tags


def test_eval_rows_in_metrics_jsonl_tensorboard_and_csv(runs):
    wd = runs["root"] / "evals"
    got = eval_rows(wd)
    assert sorted(got) == [2, 4, 6, 8], f"eval steps {sorted(got)}, expected every 2 steps across the resume"
    for step, r in got.items():
        for m in METRICS:
            v = r.get(f"eval/holdout/raw/{m}")
            assert v is not None and np.isfinite(v), f"step {step}: eval/holdout/raw/{m} missing or not finite: {r}"
    tags = tensorboard_tags(wd)
    assert {f"eval/holdout/raw/{m}" for m in METRICS} <= tags, f"TensorBoard tags: {sorted(tags)}"
    assert "eval/holdout/preview" in tags
    csv = (wd / "evals" / "holdout.csv").read_text().splitlines()
    assert csv[0] == "step," + ",".join(f"raw/{m}" for m in METRICS)
    assert [int(line.split(",")[0]) for line in csv[1:]] == [2, 4, 6, 8]
    assert sorted(p.name for p in (wd / "evals" / "holdout").glob("step_*.png")) == [
        f"step_{s:08d}.png" for s in (2, 4, 6, 8)]
    assert "over 2 devices" in runs["procs"]["evals"].stdout
    assert "evals: 2 run(s)" in runs["procs"]["evals"].stdout and "of training (" in runs["procs"]["evals"].stdout


def test_params_bit_identical_with_and_without_evals(runs):
    from dmfuse_jax.workdir import load_params

    a = load_params(runs["root"] / "evals", step=4)
    b = load_params(runs["root"] / "plain", step=4)
    import jax
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(x, y, err_msg=f"params {jax.tree_util.keystr(path)} differ with evals on")


def test_best_checkpoint_is_the_argmax_across_the_resume(runs):
    from dmfuse_jax.workdir import best_info, load_best_params
    from dmfuse_jax.workdir import load_params

    wd = runs["root"] / "evals"
    qabf = {s: r["eval/holdout/raw/Qabf"] for s, r in eval_rows(wd).items()}
    want = max(qabf, key=lambda s: (qabf[s], -s))
    info = best_info(wd)
    assert info["step"] == want and info["value"] == pytest.approx(qabf[want]), (info, qabf)
    assert [p.name for p in (wd / "best").iterdir() if p.name.isdigit()] == [str(want)]
    params, step = load_best_params(wd)
    assert step == want
    if want in (4, 6, 8):  # checkpoints/ keeps the last 3: the same weights there
        ref = load_params(wd, step=want)
        np.testing.assert_array_equal(params["head"]["conv_in1"]["conv2d"]["kernel"],
                                      ref["head"]["conv_in1"]["conv2d"]["kernel"])


def test_fuse_export_take_step_best(runs, tmp_path):
    from dmfuse_jax.cli import main
    from dmfuse_jax.workdir import best_info, load_best_params

    from dmfuse_jax.inference.checkpoints import resolve
    from dmfuse_jax.workdir import load_params

    wd = runs["root"] / "evals"
    best_params, best = load_best_params(wd)
    assert best == best_info(wd)["step"]
    for step, want in (("best", best_params), ("8", load_params(wd, step=8)), ("latest", load_params(wd))):
        got = resolve(str(wd), step=step).params
        np.testing.assert_array_equal(got["head"]["conv_in1"]["conv2d"]["kernel"],
                                      want["head"]["conv_in1"]["conv2d"]["kernel"], err_msg=f"--step {step}")
    out = tmp_path / "fused_best"
    assert main(["fuse", "--checkpoint", str(wd), "--step", "best", "--ir", str(runs["ir"]), "--vis", str(runs["vi"]),
                 "--out", str(out), "--no-progress"]) == 0
    # The evaluator fuses as `dmfuse fuse` does: the fused column of its grid at the best step (2 devices,
    # XLA opt level 0) is the centre of what `dmfuse fuse` wrote for that step's params (1 device, full
    # optimisation), up to 8-bit rounding: `dmfuse fuse` gives the colour visible image's chroma back, so
    # its PNG's luma (the RGB rounded to 8 bits, clipped, then Y: a few levels where the colour clips)
    # is compared; measured 6.4 levels max, 0.52 mean.
    from dmfuse_jax.data.images import luma, read_image
    from dmfuse_jax.training.evals import crop_center
    grid = read_image(wd / "evals" / "holdout" / f"step_{best:08d}.png")
    fused = [luma(read_image(p)) for p in sorted(out.glob("*.png"))]
    assert grid.shape[:2] == (64, 96) and len(fused) == 2
    for i, f in enumerate(fused):
        diff = np.abs(grid[32 * i:32 * (i + 1), 64:96] - crop_center(f, 32))
        assert diff.max() <= 12 / 255 and diff.mean() < 1 / 255, \
            f"pair {i}: evaluator vs dmfuse fuse: {255 * diff.max():.1f} levels max, {255 * diff.mean():.2f} mean"
    assert main(["export", "--checkpoint", str(wd), "--step", "best", "--out", str(tmp_path / "bundle"),
                 "--no-artefact"]) == 0
    assert main(["convert-npz", "--checkpoint", str(wd), "--step", "best", "--out", str(tmp_path / "bundle2")]) == 0
    got = resolve(str(tmp_path / "bundle2")).params
    np.testing.assert_array_equal(got["head"]["conv_in1"]["conv2d"]["kernel"],
                                  best_params["head"]["conv_in1"]["conv2d"]["kernel"])
    assert main(["fuse", "--checkpoint", str(tmp_path / "bundle2"), "--step", "best", "--ir", str(runs["ir"]),
                 "--vis", str(runs["vi"]), "--out", str(tmp_path / "y")]) == 2  # --step: workdirs only
    assert main(["fuse", "--checkpoint", str(wd), "--step", "nope", "--ir", str(runs["ir"]), "--vis", str(runs["vi"]),
                 "--out", str(tmp_path / "x")]) == 2


def test_report_writes_png_and_markdown(runs, tmp_path):
    from dmfuse_jax.cli import main

    wd = runs["root"] / "evals"
    assert main(["report", str(wd), "--out", str(tmp_path)]) == 0
    png = (tmp_path / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    md = (tmp_path / "report.md").read_text()
    assert "eval/holdout/raw/Qabf" in md and "Best checkpoint: step" in md
    assert main(["report", str(tmp_path / "nowhere")]) == 2


def tiny_train_argv(workdir, extra):
    return (["train", "--config", T.FUSION_CONFIG, "--workdir", str(workdir), "--compilation-cache", "off"]
            + [f"--config.{o}" for o in T.TINY["fusion"] + extra])


def test_bad_eval_folder_exits_2_before_step_1(tmp_path, capsys):
    from dmfuse_jax.cli import main

    wd = tmp_path / "bad"
    assert main(tiny_train_argv(wd, ["evals.holdout.every_steps=2", "evals.holdout.pairs=folder",
                                     f"evals.holdout.ir_dir={tmp_path / 'missing_ir'}",
                                     f"evals.holdout.vi_dir={tmp_path}"])) == 2
    err = capsys.readouterr().err
    assert "missing_ir" in err and "evals.holdout.ir_dir" in err, err
    assert not list((wd / "checkpoints").glob("*")) and not (wd / "metrics.jsonl").exists()


def test_pairs_too_small_for_a_metric_exit_2_before_step_1(tmp_path, capsys):
    from dmfuse_jax.cli import main
    from dmfuse_jax.data.images import write_image_atomic

    rng = np.random.default_rng(0)
    for part in ("ir", "vi"):
        write_image_atomic(tmp_path / part / "a.png", rng.random((32, 32, 1)).astype(np.float32))
    assert main(tiny_train_argv(tmp_path / "w", evals_overrides(tmp_path / "ir", tmp_path / "vi"))) == 2
    err = capsys.readouterr().err
    assert "a.png" in err and "MEF-SSIM" in err, err
    assert not (tmp_path / "w" / "metrics.jsonl").exists()


def test_best_metric_must_be_produced(tmp_path, capsys):
    from dmfuse_jax.cli import main

    assert main(tiny_train_argv(tmp_path / "w", ["checkpoint.best.metric=eval/holdout/raw/Nope"])) == 2
    assert "checkpoint.best.metric" in capsys.readouterr().err


def test_unknown_type_or_option_is_a_user_error():
    import ml_collections

    from dmfuse_jax.errors import UserError
    from dmfuse_jax.training.evals import EvalRunner

    config = T.tiny_config("fusion")
    with config.unlocked():
        config.evals.bad = ml_collections.ConfigDict(dict(type="fusion_metrics", every_steps=2, every_step=4))
    with pytest.raises(UserError, match="unknown option.*every_step"):
        EvalRunner(config, None, None, 4, None)
    with config.unlocked():
        config.evals.bad = ml_collections.ConfigDict(dict(type="fusion_metric", every_steps=2))
    with pytest.raises(UserError, match="fusion_metric.*expected one of"):
        EvalRunner(config, None, None, 4, None)


def test_stage1_evaluators_diffusion_loss_and_sample_grid(tmp_path):
    """diffusion_loss: fixed timesteps and noise (the same params give the same values; other params
    other values), per timestep and their mean; sample_grid: samples/step_*.png."""
    import jax

    from dmfuse_jax.data.images import write_image_atomic
    from dmfuse_jax.training.evals import DiffusionLoss, SampleGrid
    from dmfuse_jax.training.train import build_stage
    from dmfuse_jax.training.trainer import Trainer

    rng = np.random.default_rng(0)
    for i in range(3):
        write_image_atomic(tmp_path / "imgs" / f"sub{i % 2}" / f"{i}.png", rng.random((20 + i, 24, 1)).astype(np.float32))
    config = T.tiny_config("pretrain", [f"evals.tno.root={tmp_path / 'imgs'}", "evals.tno.timesteps=(10, 150)",
                                        "evals.samples.sample_steps=2", "evals.samples.num_samples=2"])
    stage = build_stage(config)
    trainer = Trainer(config, stage, total_steps=1)
    trainer.workdir = tmp_path / "w"
    state = trainer.init_state()
    ev = DiffusionLoss("tno", config.evals.tno, config, stage, trainer)
    assert ev.n == 3 and ev.keys() == ["ema/loss", "ema/loss_t0010", "ema/loss_t0150",
                                       "raw/loss", "raw/loss_t0010", "raw/loss_t0150"]
    a, b = ev.run(state, 1), ev.run(state, 2)
    assert a == b and all(np.isfinite(list(a.values()))), (a, b)
    assert a["raw/loss"] == pytest.approx((a["raw/loss_t0010"] + a["raw/loss_t0150"]) / 2)
    other = state.replace(params=jax.tree.map(lambda x: x * 0.5, state.params))
    assert ev.run(other, 3)["raw/loss"] != a["raw/loss"] and ev.run(other, 3)["ema/loss"] == a["ema/loss"]
    grid = SampleGrid("samples", config.evals.samples, config, stage, trainer)
    assert grid.run(state, 5) == {} and (tmp_path / "w" / "samples" / "step_00000005.png").is_file()
    trainer.close()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_split_the_metrics_and_agree(runs):
    """2 processes (loopback, 2 forced host devices each: a 4-device mesh): pair i is scored on process
    i % 2 and gathered; the values equal the 1-process (2-device) run's and only process 0 writes."""
    from test_multiprocess import free_port, wait_all

    root = runs["root"]
    port, procs = free_port(), []
    for pid in range(2):
        env = {**runs["env"], "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
               "JAX_PROCESS_ID": str(pid), "DMFUSE_DISTRIBUTED_TIMEOUT": "120"}
        procs.append(T.start_training("fusion", root / "multi", evals_overrides(runs["ir"], runs["vi"]), env=env,
                                      log=root / f"multi_{pid}.log"))
    rcs = wait_all(procs)
    logs = "\n".join((root / f"multi_{pid}.log").read_text()[-2000:] for pid in range(2))
    assert rcs == [0, 0], logs
    one, two = eval_rows(root / "evals"), eval_rows(root / "multi")
    for step in (2, 4):
        for m in METRICS:
            k = f"eval/holdout/raw/{m}"
            assert two[step][k] == pytest.approx(one[step][k], rel=1e-3, abs=1e-4), (step, k, logs)
    assert len((root / "multi" / "evals" / "holdout.csv").read_text().splitlines()) == 3


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
