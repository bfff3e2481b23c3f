"""grain worker processes (`data.worker_count > 0`) for both stages: the same batches in the same order
as without workers, the skipped-file count carried by the data (right however many workers), and a
fusion-stage training run with two workers that is stopped (SIGTERM), resumed from its checkpoint
(grain's multi-worker iterator state) and, at its second start, takes its train step from the
persistent compilation cache instead of compiling it again.
"""
from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
from PIL import Image

from dmfuse_jax.errors import EXIT_PREEMPTED
from dmfuse_jax.data import fusion_pairs as fp
from dmfuse_jax.data import pipeline as pl
from dmfuse_jax.data.pretrain import ImageFolderSource, PretrainTransform
import helpers as T

pytestmark = pytest.mark.multiprocess
TIMEOUT = int(os.environ.get("DMFUSE_TEST_TIMEOUT", "600"))  # seconds per run; raise on a loaded machine


def write_png(path, h, w, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)).save(path)


def image_folder(root, readable: int = 5, corrupt: int = 2):
    """`readable` images and `corrupt` unreadable ones, interleaved in the sorted order."""
    for i in range(readable):
        write_png(root / f"img{i}a.png", 20, 24, seed=i)
    for i in range(corrupt):
        (root / f"img{i}b.png").write_bytes(b"\x89PNG broken")
    return root


def take(ds, worker_count: int, n: int) -> list[dict]:
    it = pl.train_iterator(ds, num_threads=1, prefetch=2, worker_count=worker_count)
    return [next(it) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for step, (x, y) in enumerate(zip(a, b)):
        assert sorted(x) == sorted(y)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=f"batch {step} key {k}: workers change the data")


def test_pretrain_workers_same_batches_and_skipped_count(tmp_path):
    src = ImageFolderSource(image_folder(tmp_path / "images"))
    ds = pl.train_dataset(src, PretrainTransform(16, 1), seed=0, global_batch=4)
    steps = 4  # 16 elements: more than two passes over the 7 files
    serial, workers = take(ds, 0, steps), take(ds, 2, steps)
    assert_same_batches(serial, workers)
    skipped = sum(int(b["skipped"].sum()) for b in workers)
    # What the data holds: the same order without the transform (the images are all 20x24).
    serial_raw = pl.train_dataset(src, None, seed=0, global_batch=4)
    expected = sum(int(serial_raw[step]["skipped"].sum()) for step in range(steps))
    assert skipped == expected > 0, f"skipped files counted {skipped}, the data has {expected}"


@pytest.mark.slow  # CI covers fusion with workers through the training run below
def test_fusion_workers_same_batches(tmp_path):
    ir, vi = tmp_path / "ir", tmp_path / "vi"
    for i in range(3):
        write_png(ir / f"p{i}.png", 32, 40, seed=i)
        write_png(vi / f"p{i}.png", 32, 40, seed=10 + i)
    train, _ = fp.split_pairs(ir, vi)
    ds = pl.train_dataset(fp.PairedPatchSource(train, patch=16, step=12), None, seed=1, global_batch=4)
    assert_same_batches(take(ds, 0, 3), take(ds, 2, 3))


def wait_for(proc, workdir, text: str) -> None:
    t0 = time.time()
    while time.time() - t0 < TIMEOUT:
        if text in T.read_log(workdir):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc {proc.returncode}) before {text!r}:\n{T.read_log(workdir)[-3000:]}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"no {text!r} within {TIMEOUT} s:\n{T.read_log(workdir)[-3000:]}")


def test_fusion_training_with_workers_resumes_and_reuses_compiled_step(tmp_path):
    """Both starts use the default cache folder ($XDG_CACHE_HOME/dmfuse_jax/xla): on by default."""
    env = T.subprocess_env(None, XDG_CACHE_HOME=str(tmp_path / "cache"), JAX_LOG_COMPILES="1")
    for key in ("JAX_COMPILATION_CACHE_DIR", "DMFUSE_COMPILATION_CACHE"):
        env.pop(key, None)
    work = tmp_path / "fusion"
    extra = ["data.worker_count=2", "total_steps=4", "checkpoint_every_steps=2"]
    first = T.start_training("fusion", work, extra, env=env, hang_after=2)
    wait_for(first, work, "HANG at step 2")
    first.send_signal(signal.SIGTERM)
    assert first.wait(TIMEOUT) == EXIT_PREEMPTED, T.read_log(work)[-3000:]  # preempted: checkpoint saved
    log1 = T.read_log(work)
    assert "stopped by SIGTERM at step 2" in log1, log1[-3000:]
    cache = tmp_path / "cache" / "dmfuse_jax" / "xla"
    entries = sorted(os.listdir(cache))
    assert any("train_step" in e for e in entries), f"no train step in the compilation cache: {entries}"
    assert "Persistent compilation cache hit for 'jit_train_step'" not in log1

    second = T.start_training("fusion", work, extra, env=env)
    assert second.wait(TIMEOUT) == 0, T.read_log(work)[-3000:]
    log2 = T.read_log(work)
    assert "resumed from" in log2 and "/checkpoints/2" in log2, log2[-3000:]
    assert "done: 4 steps" in log2, log2[-3000:]
    assert "Persistent compilation cache hit for 'jit_train_step'" in log2, \
        "the second start compiled the train step again:\n" + log2[-3000:]
    data = work / "checkpoints" / "4" / "data"
    assert sorted(p.name for p in data.glob("*.json")) == ["process_0-of-1.json"]
