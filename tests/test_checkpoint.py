"""Exact resume after SIGKILL / SIGTERM, corrupt-checkpoint fallback, restores that must fail loudly,
load_params / load_workdir_config.

Tiny stage-1 runs (6 steps, checkpoints every 2) in subprocesses, sharing one XLA compilation cache:
  reference: uninterrupted
  kill:      hangs after step 4 (its checkpoint committed), SIGKILL, restarted
  term:      hangs after step 3 (no checkpoint due), SIGTERM -> saves step 3 and exits, restarted
  corrupt:   a copy of the reference with checkpoint 6 damaged, restarted -> sets 6 aside, resumes from 4
  config:    a copy of the reference restarted with another model config -> exit 2, nothing moved
Each restarted run must end with params (and EMA params) equal to the reference's. The fusion stage
(4 steps) is killed after its checkpoint 2 and resumed the same way. Restores of damaged copies
(truncated / missing files), of another config and through a failing reader run in-process.
"""
from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest

import helpers as T

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


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    env = T.subprocess_env(root / "xla_cache")
    ref = root / "reference"
    p_ref = T.start_training("pretrain", ref, env=env)
    assert finish(p_ref, ref) == 0, T.read_log(ref)[-3000:]
    # The interrupted runs start after the reference, so they reuse its compiled programs.
    kill, term = root / "kill", root / "term"
    p_kill = T.start_training("pretrain", kill, env={**env, "DMFUSE_DEBUG_HANG_AFTER_STEP": "4"})
    p_term = T.start_training("pretrain", term, env={**env, "DMFUSE_DEBUG_HANG_AFTER_STEP": "3"})
    wait_for(p_kill, kill, "HANG at step 4")
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
    rcs = {name: finish(p, root / name) for name, p in procs.items()}
    return dict(root=root, rc_kill=rc_kill, rc_term=rc_term, rcs=rcs, after_interrupt=after_interrupt,
                corrupt_copy=corrupt_copy)


def step_dirs(workdir: Path) -> list[str]:
    return sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_sigkill_after_checkpoint_resumes_exactly(runs):
    from dmfuse_jax.training.checkpoint import load_params
    root = runs["root"]
    assert runs["rc_kill"] == -signal.SIGKILL
    assert runs["after_interrupt"]["kill"] == [2, 4], "the killed run should have left checkpoints 2 and 4"
    assert runs["rcs"]["kill"] == 0, T.read_log(root / "kill")[-3000:]
    assert "resumed from" in T.read_log(root / "kill") and "/checkpoints/4" in T.read_log(root / "kill")
    for ema in (False, True):
        assert_trees_equal(load_params(root / "kill", ema=ema), load_params(root / "reference", ema=ema),
                           f"killed+resumed vs uninterrupted (ema={ema})")


def test_sigterm_saves_and_resumes_exactly(runs):
    from dmfuse_jax.training.checkpoint import load_params
    root = runs["root"]
    assert runs["rc_term"] == 0, runs["after_interrupt"]["term_log"][-3000:]
    assert "stopped by SIGTERM at step 3" in runs["after_interrupt"]["term_log"]
    assert runs["after_interrupt"]["term"] == [2, 3], "SIGTERM at step 3 should save checkpoint 3"
    assert runs["rcs"]["term"] == 0
    assert "/checkpoints/3" in T.read_log(root / "term")
    for ema in (False, True):
        assert_trees_equal(load_params(root / "term", ema=ema), load_params(root / "reference", ema=ema),
                           f"SIGTERM+resumed vs uninterrupted (ema={ema})")


# orbax's failed restore of the damaged step leaves a tensorstore callback that fires on its closed
# asyncio loop ("Event loop is closed", ignored by Python): third-party noise, not a dmfuse failure.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_corrupt_newest_checkpoint_falls_back(runs):
    from dmfuse_jax.training.checkpoint import CorruptCheckpointWarning, load_params
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


def test_load_workdir_config_and_errors(runs, tmp_path):
    from dmfuse_jax.errors import UserError
    from dmfuse_jax.training.checkpoint import load_params, load_workdir_config
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


def wrong_checksums(step_dir: Path) -> None:
    """Readable files whose arrays do not match the recorded sums: step 2's 'integrity' item."""
    shutil.rmtree(step_dir / "integrity")
    shutil.copytree(step_dir.parent / "2" / "integrity", step_dir / "integrity")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", [truncate_train_files, delete_weights_files, wrong_checksums],
                         ids=["truncated", "missing", "checksum"])
def test_damaged_newest_checkpoint_is_set_aside_never_deleted(runs, tmp_path, damage):
    from dmfuse_jax.training.checkpoint import CorruptCheckpointWarning
    wd = tmp_path / "wd"
    shutil.copytree(runs["root"] / "reference", wd)
    damage(wd / "checkpoints" / "6")
    with pytest.warns(CorruptCheckpointWarning, match="checkpoints/6 failed its integrity check"):
        (state, step), it = restore(wd)
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
    p_kill = T.start_training("fusion", kill, env={**env, "DMFUSE_DEBUG_HANG_AFTER_STEP": "2"})
    wait_for(p_kill, kill, "HANG at step 2")
    p_kill.send_signal(signal.SIGKILL)
    rc_kill = finish(p_kill, kill)
    left = step_dirs(kill)
    rc = finish(T.start_training("fusion", kill, env=env), kill)
    return dict(root=root, rc_kill=rc_kill, left=left, rc=rc)


def test_fusion_sigkill_after_checkpoint_resumes_exactly(fusion_runs):
    from dmfuse_jax.training.checkpoint import load_params
    root = fusion_runs["root"]
    assert fusion_runs["rc_kill"] == -signal.SIGKILL and fusion_runs["left"] == ["2"]
    assert fusion_runs["rc"] == 0, T.read_log(root / "kill")[-3000:]
    assert "/checkpoints/2" in T.read_log(root / "kill")
    assert_trees_equal(load_params(root / "kill"), load_params(root / "reference"), "fusion killed+resumed")


def test_checksums_compile_once_per_layout_and_stay_on_device():
    import jax
    import jax.numpy as jnp

    from dmfuse_jax.training import checkpoint as ck
    tree = {"a": jnp.arange(6.0).reshape(2, 3), "b": {"c": -jnp.ones(4, jnp.int32)}}
    before = ck._abs_sums()._cache_size()
    for scale in (1.0, 2.0, 3.0):  # three saves of the same layout
        sums = ck.array_checksums(jax.tree.map(lambda x: x * scale, tree))
        assert isinstance(sums, jax.Array)  # a device array: saved as is, no host sync
    assert ck._abs_sums()._cache_size() - before == 1, "the checksum function was compiled more than once"
    np.testing.assert_allclose(np.asarray(sums), [45.0, 12.0])
    ck.compare_checksums(ck.leaf_names(tree), [15.0, 4.0], np.asarray(ck.array_checksums(tree)), "x")
    with pytest.raises(ck.IntegrityError, match=r"checksum mismatch for \['b'\]\['c'\]"):
        ck.compare_checksums(ck.leaf_names(tree), [15.0, 5.0], np.asarray(ck.array_checksums(tree)), "x")
