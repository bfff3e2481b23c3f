"""Exact resume after SIGKILL / SIGTERM, corrupt-checkpoint fallback, load_params / load_workdir_config.

Tiny stage-1 runs (6 steps, checkpoints every 2) in subprocesses, sharing one XLA compilation cache:
  reference: uninterrupted
  kill:      hangs after step 4 (its checkpoint committed), SIGKILL, restarted
  term:      hangs after step 3 (no checkpoint due), SIGTERM -> saves step 3 and exits, restarted
  corrupt:   a copy of the reference with checkpoint 6 damaged, restarted -> falls back to 4
Each restarted run must end with params (and EMA params) equal to the reference's.
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
    procs = {name: T.start_training("pretrain", root / name, env=env) for name in ("kill", "term", "corrupt")}
    rcs = {name: finish(p, root / name) for name, p in procs.items()}
    return dict(root=root, rc_kill=rc_kill, rc_term=rc_term, rcs=rcs, after_interrupt=after_interrupt,
                corrupt_copy=corrupt_copy)


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
    assert "is corrupt" in log and "/checkpoints/4" in log, log[-3000:]
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
