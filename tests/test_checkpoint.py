"""Exact resume after SIGKILL / SIGTERM, corrupt-checkpoint fallback, restores that must fail loudly,
load_params / load_workdir_config, one writer per workdir, the divergence guard.

Tiny stage-1 runs (6 steps, checkpoints every 2) in subprocesses, sharing one XLA compilation cache:
  reference: uninterrupted
  kill:      hangs after step 4 (its checkpoint committed); a second `dmfuse train` on its workdir is
             refused (exit 2, naming it); SIGKILL; restarted (takes over the dead run's lock)
  term:      hangs after step 3 (no checkpoint due), SIGTERM -> saves step 3, exits 75; restarted
  corrupt:   a copy of the reference with checkpoint 6 damaged, restarted -> sets 6 aside, resumes from 4
  config:    a copy of the reference restarted with another model config -> exit 2, nothing moved
  diverge:   learning rate 1e30: the loss turns non-finite at step 3 -> exit 3, only finite checkpoints
             (skipping such steps, max_nonfinite_steps: test_robustness.py, in-process)
Each restarted run must end with params (and EMA params) equal to the reference's. The fusion stage
(4 steps) is killed after its checkpoint 2 and resumed the same way. Restores of damaged copies
(truncated / missing files, one flipped byte), of another config and through a failing reader run
in-process.
"""
from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest

import helpers as T
from dmfuse_jax.errors import EXIT_DIVERGED, EXIT_PREEMPTED

TIMEOUT = 240


def wait_for(proc, workdir, text: str, timeout: float = TIMEOUT) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if text in T.read_log(workdir):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run {workdir} exited ({proc.returncode}) before printing {text!r}:\n"
                                 + T.read_log(workdir)[-3000:])
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"run {workdir} did not print {text!r} within {timeout} s:\n" + T.read_log(workdir)[-3000:])


def finish(proc, workdir) -> int:
    try:
        rc = proc.wait(TIMEOUT)
    except Exception:
        proc.kill()
        raise
    return rc


def assert_trees_equal(a, b, what: str) -> None:
    import jax
    fa, fb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [k for k, _ in fa] == [k for k, _ in fb], f"{what}: different trees"
    for (k, x), (_, y) in zip(fa, fb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f"{what}: {jax.tree_util.keystr(k)}")


def corrupt_checkpoint(step_dir: Path) -> None:
    """Overwrite the array data files of the 'weights' item with garbage (same sizes)."""
    files = [p for p in (step_dir / "weights").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files, f"no data files found under {step_dir / 'weights'}"
    for p in files:
        p.write_bytes(b"\x00garbage" * (max(1, p.stat().st_size) // 8 + 1))


# Adam moves every weight by about the learning rate: 5e29 after warmup step 2, so step 3 overflows.
BLOW_UP = "optimizer.learning_rate=1e30"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    env = T.subprocess_env(root / "xla_cache")
    ref = root / "reference"
    p_ref = T.start_training("pretrain", ref, env=env)
    assert finish(p_ref, ref) == 0, T.read_log(ref)[-3000:]
    # The interrupted runs start after the reference, so they reuse its compiled programs.
    kill, term = root / "kill", root / "term"
    p_kill = T.start_training("pretrain", kill, env=env, hang_after=4)
    p_term = T.start_training("pretrain", term, env=env, hang_after=3)
    wait_for(p_kill, kill, "HANG at step 4")
    second = T.start_training("pretrain", kill, env=env, log=root / "second.log")  # same workdir, at once
    rc_second = finish(second, kill)
    p_kill.send_signal(signal.SIGKILL)
    wait_for(p_term, term, "HANG at step 3")
    p_term.send_signal(signal.SIGTERM)
    rc_kill, rc_term = finish(p_kill, kill), finish(p_term, term)
    after_interrupt = {"kill": sorted(int(p.name) for p in (kill / "checkpoints").iterdir() if p.name.isdigit()),
                       "term": sorted(int(p.name) for p in (term / "checkpoints").iterdir() if p.name.isdigit()),
                       "term_log": T.read_log(term)}
    corrupt = root / "corrupt"
    shutil.copytree(ref, corrupt)
    corrupt_checkpoint(corrupt / "checkpoints" / "6")
    corrupt_copy = root / "corrupt_readonly"
    shutil.copytree(corrupt, corrupt_copy)
    changed = root / "config"
    shutil.copytree(ref, changed)
    procs = {name: T.start_training("pretrain", root / name, env=env) for name in ("kill", "term", "corrupt")}
    procs["config"] = T.start_training("pretrain", changed, ["model.unet.dropout=0.2"], env=env)
    procs["diverge"] = T.start_training("pretrain", root / "diverge", [BLOW_UP], env=env)
    rcs = {name: finish(p, root / name) for name, p in procs.items()}
    return dict(root=root, rc_kill=rc_kill, rc_term=rc_term, rcs=rcs, after_interrupt=after_interrupt,
                corrupt_copy=corrupt_copy, rc_second=rc_second, second_log=(root / "second.log").read_text(),
                kill_pid=p_kill.pid)


def step_dirs(workdir: Path) -> list[str]:
    return sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_sigkill_after_checkpoint_resumes_exactly(runs):
    from dmfuse_jax.workdir import load_params
    root = runs["root"]
    assert runs["rc_kill"] == -signal.SIGKILL
    assert runs["after_interrupt"]["kill"] == [2, 4], "the killed run should have left checkpoints 2 and 4"
    assert runs["rcs"]["kill"] == 0, T.read_log(root / "kill")[-3000:]
    assert "resumed from" in T.read_log(root / "kill") and "/checkpoints/4" in T.read_log(root / "kill")
    assert f"StaleLockWarning: {root / 'kill' / 'train.lock'}: taking over the lock left by pid {runs['kill_pid']}" \
        in T.read_log(root / "kill"), T.read_log(root / "kill")[-3000:]
    for ema in (False, True):
        assert_trees_equal(load_params(root / "kill", ema=ema), load_params(root / "reference", ema=ema),
                           f"killed+resumed vs uninterrupted (ema={ema})")


def test_sigterm_saves_and_resumes_exactly(runs):
    from dmfuse_jax.workdir import load_params
    root = runs["root"]
    assert runs["rc_term"] == EXIT_PREEMPTED, runs["after_interrupt"]["term_log"][-3000:]
    assert "stopped by SIGTERM at step 3" in runs["after_interrupt"]["term_log"]
    assert runs["after_interrupt"]["term"] == [2, 3], "SIGTERM at step 3 should save checkpoint 3"
    assert runs["rcs"]["term"] == 0
    assert "/checkpoints/3" in T.read_log(root / "term")
    for ema in (False, True):
        assert_trees_equal(load_params(root / "term", ema=ema), load_params(root / "reference", ema=ema),
                           f"SIGTERM+resumed vs uninterrupted (ema={ema})")


def test_corrupt_newest_checkpoint_falls_back(runs):
    from dmfuse_jax.workdir import CorruptCheckpointWarning, load_params
    root = runs["root"]
    # Reading: load_params skips the damaged step 6 with a warning and returns step 4.
    with pytest.warns(CorruptCheckpointWarning, match="checkpoints/6"):
        got = load_params(runs["corrupt_copy"])
    assert_trees_equal(got, load_params(root / "reference", step=4), "fallback params vs step 4")
    # Training: the restarted run moves 6 aside, resumes from 4 and ends where the reference ended.
    log = T.read_log(root / "corrupt")
    assert runs["rcs"]["corrupt"] == 0, log[-3000:]
    assert "failed its integrity check" in log and "resumed from" in log and "/checkpoints/4" in log, log[-3000:]
    assert (root / "corrupt" / "corrupt_checkpoints" / "6").is_dir()
    assert_trees_equal(load_params(root / "corrupt"), load_params(root / "reference"), "resumed after corruption")
    # Step 6 ran twice (before the damage, and after resuming from 4): metrics.jsonl still has one line.
    assert logged_steps(root / "corrupt") == logged_steps(root / "reference") == [2, 4, 6]
    assert logged_steps(root / "kill") == [2, 4, 6]


def logged_steps(workdir: Path) -> list[int]:
    import json
    return [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_a_second_trainer_on_a_workdir_is_refused_and_the_first_ones_checkpoints_are_sound(runs):
    from dmfuse_jax.workdir import load_params
    root, log = runs["root"], runs["second_log"]
    assert runs["rc_second"] == 2, log[-3000:]
    errors = [line for line in log.splitlines() if "error" in line]
    assert len(errors) == 1 and f"{root / 'kill'}: another dmfuse train is writing this workdir (pid " \
        f"{runs['kill_pid']} on host" in errors[0], log[-3000:]
    assert "compiled" not in log, "the second run got past the lock"
    for step in (2, 4, 6):  # every checkpoint of the (killed, resumed) first run restores and verifies
        load_params(root / "kill", step=step)


def test_a_learning_rate_that_blows_up_stops_with_exit_3_and_no_nonfinite_checkpoint(runs):
    import jax

    from dmfuse_jax.workdir import load_params
    root = runs["root"]
    log = T.read_log(root / "diverge")
    assert runs["rcs"]["diverge"] == EXIT_DIVERGED, log[-3000:]
    [line] = [line for line in log.splitlines() if line.startswith("dmfuse train: error:")]
    assert "step 3: non-finite loss" in line and "last checkpoint: step 2, finite" in line, line
    assert step_dirs(root / "diverge") == ["2"], "a checkpoint was saved after the loss turned non-finite"
    for ema in (False, True):
        for x in jax.tree_util.tree_leaves(load_params(root / "diverge", ema=ema, step=2)):
            assert np.all(np.isfinite(x)), "checkpoint 2 holds a non-finite array"


def test_load_workdir_config_and_errors(runs, tmp_path):
    from dmfuse_jax.errors import UserError
    from dmfuse_jax.workdir import load_params, load_workdir_config
    cfg = load_workdir_config(runs["root"] / "reference")
    assert cfg.stage == "pretrain" and cfg.total_steps == 6
    assert cfg.model.unet.channel_mults == (1, 2, 2)  # tuples survive the JSON round trip
    params = load_params(runs["root"] / "reference")
    assert "init_conv" in params and isinstance(params["init_conv"]["kernel"], np.ndarray)
    with pytest.raises(UserError, match=str(tmp_path)):
        load_params(tmp_path)
    (tmp_path / "config.json").write_text(cfg.to_json())
    with pytest.raises(UserError, match="no checkpoints"):
        load_params(tmp_path)


def test_config_change_on_resume_exits_2_and_keeps_every_checkpoint(runs):
    root = runs["root"]
    log = T.read_log(root / "config")
    assert runs["rcs"]["config"] == 2, log[-3000:]
    assert "model.unet.dropout: 0.1 when checkpointed, 0.2 now" in log, log[-3000:]
    assert step_dirs(root / "config") == step_dirs(root / "reference") == ["2", "4", "6"]
    assert not (root / "config" / "corrupt_checkpoints").exists()
    assert (root / "config" / "config.json").read_text() == (root / "reference" / "config.json").read_text()


# -- restores in-process (no training): what counts as corruption, and what must fail loudly


def restore(workdir: Path, extra=()):
    """Checkpointer.restore_latest of a tiny stage-1 workdir as `fit` calls it: (state, step) or None,
    and the data iterator."""
    from dmfuse_jax.data.pipeline import train_dataset, train_iterator
    from dmfuse_jax.training.checkpoint import Checkpointer
    from dmfuse_jax.training.train import build_stage
    from dmfuse_jax.training.trainer import Trainer

    config = T.tiny_config("pretrain", list(extra))
    stage = build_stage(config)
    trainer = Trainer(config, stage)
    source, transform = stage.train_source(workdir)
    it = train_iterator(train_dataset(source, transform, seed=int(config.seed), global_batch=int(config.batch_size)),
                        num_threads=1, prefetch=1)
    ckpt = Checkpointer(workdir, every=2, stage=stage.name, config=config, async_save=False)
    try:
        return ckpt.restore_latest(trainer.abstract_state, trainer.state_sharding, it), it
    finally:
        ckpt.close()


def data_files(step_dir: Path, item: str) -> list[Path]:
    files = sorted(p for p in (step_dir / item).rglob("*") if p.is_file() and p.parent.name == "d")
    assert files, f"no data files under {step_dir / item}"
    return files


def truncate_train_files(step_dir: Path) -> None:
    for f in data_files(step_dir, "train"):  # the optimizer state's files, cut in half
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def delete_weights_files(step_dir: Path) -> None:
    for f in data_files(step_dir, "weights"):
        f.unlink()


def flip_one_byte(step_dir: Path) -> None:
    """One byte of the largest 'weights' data file (compressed chunks that still decode)."""
    f = max(data_files(step_dir, "weights"), key=lambda p: p.stat().st_size)
    data = bytearray(f.read_bytes())
    data[len(data) // 3] ^= 0x01
    f.write_bytes(bytes(data))


def wrong_checksums(step_dir: Path) -> None:
    """Readable files whose arrays do not match the recorded sums: step 2's 'integrity' item."""
    shutil.rmtree(step_dir / "integrity")
    shutil.copytree(step_dir.parent / "2" / "integrity", step_dir / "integrity")


@pytest.mark.parametrize("damage", [truncate_train_files, delete_weights_files, wrong_checksums, flip_one_byte],
                         ids=["truncated", "missing", "checksum", "one_byte"])
def test_damaged_newest_checkpoint_is_set_aside_never_deleted(runs, tmp_path, damage, capfd):
    from dmfuse_jax.workdir import CorruptCheckpointWarning
    wd = tmp_path / "wd"
    shutil.copytree(runs["root"] / "reference", wd)
    damage(wd / "checkpoints" / "6")
    match = ".*fails its content checksum" if damage in (wrong_checksums, flip_one_byte) else ""
    with pytest.warns(CorruptCheckpointWarning, match=f"checkpoints/6 failed its integrity check{match}"):
        (state, step), it = restore(wd)
    assert "Event loop is closed" not in capfd.readouterr().err, "orbax's closed-loop tracebacks are back"
    assert step == 4 and int(state.step) == 4 and it.get_state() == {"next_index": 4}
    assert step_dirs(wd) == ["2", "4"]
    assert (wd / "corrupt_checkpoints" / "6" / "weights").is_dir(), "the damaged checkpoint was not kept"


def test_config_change_is_refused_in_place(runs, tmp_path):
    from dmfuse_jax.errors import UserError
    wd = tmp_path / "wd"
    shutil.copytree(runs["root"] / "reference", wd)
    with pytest.raises(UserError, match=r"optimizer\.learning_rate: .* when checkpointed, 0\.5 now"):
        restore(wd, ["optimizer.learning_rate=0.5"])
    assert step_dirs(wd) == ["2", "4", "6"] and not (wd / "corrupt_checkpoints").exists()
    # A kernel choice is not a config change: the same weights whichever runs.
    (state, step), _ = restore(wd, ["model.head.caim_impl=pallas"])
    assert step == 6


def test_read_failure_that_is_not_damage_fails_loudly(runs, tmp_path, monkeypatch):
    """A transient I/O error is raised as it is: no checkpoint is moved, training does not restart."""
    import orbax.checkpoint as ocp
    wd = tmp_path / "wd"
    shutil.copytree(runs["root"] / "reference", wd)

    def failing_restore(self, step, *a, **k):
        raise OSError(5, "Input/output error (NFS server not responding)")

    monkeypatch.setattr(ocp.CheckpointManager, "restore", failing_restore)
    with pytest.raises(OSError, match="NFS server"):
        restore(wd)
    assert step_dirs(wd) == ["2", "4", "6"] and not (wd / "corrupt_checkpoints").exists()


# -- the fusion stage: SIGKILL after checkpoint 2 of 4, resumed


@pytest.fixture(scope="module")
def fusion_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt_fusion")
    env = T.subprocess_env(root / "xla_cache")
    ref, kill = root / "reference", root / "kill"
    assert finish(T.start_training("fusion", ref, env=env), ref) == 0, T.read_log(ref)[-3000:]
    p_kill = T.start_training("fusion", kill, env=env, hang_after=2)
    wait_for(p_kill, kill, "HANG at step 2")
    p_kill.send_signal(signal.SIGKILL)
    rc_kill = finish(p_kill, kill)
    left = step_dirs(kill)
    rc = finish(T.start_training("fusion", kill, env=env), kill)
    return dict(root=root, rc_kill=rc_kill, left=left, rc=rc)


@pytest.mark.slow  # CI budget: stage-1 SIGKILL resume and the fusion-stage SIGTERM resume (test_data_workers) stay in CI
def test_fusion_sigkill_after_checkpoint_resumes_exactly(fusion_runs):
    from dmfuse_jax.workdir import load_params
    root = fusion_runs["root"]
    assert fusion_runs["rc_kill"] == -signal.SIGKILL and fusion_runs["left"] == ["2"]
    assert fusion_runs["rc"] == 0, T.read_log(root / "kill")[-3000:]
    assert "/checkpoints/2" in T.read_log(root / "kill")
    assert_trees_equal(load_params(root / "kill"), load_params(root / "reference"), "fusion killed+resumed")


def test_checkpoints_written_before_content_checksums_are_refused_not_trusted(runs, tmp_path):
    """A checkpoint whose meta names no content checksum (the sum |x| format) is a UserError, not damage:
    nothing is set aside and nothing is trained from unverified arrays."""
    import json

    from dmfuse_jax.errors import UserError
    from dmfuse_jax.workdir import load_params
    wd = tmp_path / "wd"
    shutil.copytree(runs["root"] / "reference", wd)
    for step in ("2", "4", "6"):
        meta_file = wd / "checkpoints" / step / "meta" / "metadata"  # orbax's JSON item
        meta = json.loads(meta_file.read_text())
        del meta["checksum"]
        meta_file.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="without content checksums"):
        load_params(wd)
    with pytest.raises(UserError, match="without content checksums"):
        restore(wd)
    assert step_dirs(wd) == ["2", "4", "6"] and not (wd / "corrupt_checkpoints").exists()
