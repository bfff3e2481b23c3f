"""Two processes joined by `jax.distributed.initialize` on loopback (CPU collectives via gloo) train
the tiny stage-1 config and end with the same params as one process on the same global batch.

Each process holds one CPU device and reads its own half of every global batch (grain sharding per
process); the 1-process run reads the whole batch. Both use the `dmfuse train` entry point.

Resumes: copies of the 2-process workdir without its last checkpoint (as a run stopped after step 2)
are resumed by 2 processes (must end exactly where the 2-process run ended) and by 1 process (params
and optimizer state restored, the data position re-derived: must end where the 1-process run ended).
"""
from __future__ import annotations

import shutil
import socket

import numpy as np
import pytest

import helpers as T

pytestmark = pytest.mark.multiprocess
TIMEOUT = 300
STEPS = ["total_steps=4", "checkpoint_every_steps=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_two(root, name, env, steps=STEPS):
    port = free_port()
    procs = []
    for pid in range(2):
        penv = {**env, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
                "JAX_PROCESS_ID": str(pid)}
        procs.append(T.start_training("pretrain", root / name, steps, env=penv, log=root / f"{name}_{pid}.log"))
    return procs


def wait_all(procs) -> list[int]:
    rcs = []
    for p in procs:
        try:
            rcs.append(p.wait(TIMEOUT))
        except Exception:
            for q in procs:
                q.kill()
            raise
    return rcs


def without_last_checkpoint(src, dst):
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "checkpoints" / "4")
    return dst


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess")
    env = T.subprocess_env(root / "xla_cache", DMFUSE_DISTRIBUTED_TIMEOUT="120")
    single = T.start_training("pretrain", root / "single", STEPS, env=env)
    rcs = wait_all([single] + start_two(root, "multi", env))
    # The resumed runs reuse the compiled programs of the runs above (shared cache).
    without_last_checkpoint(root / "multi", root / "resume2")
    without_last_checkpoint(root / "multi", root / "resume1")
    resumed = start_two(root, "resume2", env) + [T.start_training("pretrain", root / "resume1", STEPS, env=env)]
    rcs += wait_all(resumed)
    names = ("single", "multi_0", "multi_1", "resume2_0", "resume2_1", "resume1")
    logs = {name: (root / f"{name}.log").read_text() for name in names}
    return dict(root=root, rcs=rcs, logs=logs)


def logs_of(runs, *names):
    return "\n\n".join(f"== {k}\n{runs['logs'][k][-2500:]}" for k in names)


def test_two_processes_equal_one_process(runs):
    import jax

    from dmfuse_jax.workdir import load_params
    assert runs["rcs"][:3] == [0, 0, 0], logs_of(runs, "single", "multi_0", "multi_1")
    assert "2 process(es)" in runs["logs"]["multi_0"], runs["logs"]["multi_0"][-2000:]
    root = runs["root"]
    for ema in (False, True):
        a, b = load_params(root / "single", ema=ema), load_params(root / "multi", ema=ema)
        fa, fb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_leaves(b)
        assert len(fa) == len(fb)
        for (k, x), y in zip(fa, fb):
            # float32 tolerance: the gradient all-reduce sums in another order (see test_sharding).
            scale = 1e-3 + np.max(np.abs(x))
            assert np.max(np.abs(x - y)) / scale < 5e-4, f"{jax.tree_util.keystr(k)} (ema={ema}) differs"


def test_each_process_checkpoints_its_data_iterator(runs):
    data = runs["root"] / "multi" / "checkpoints" / "4" / "data"
    assert sorted(p.name for p in data.glob("*.json")) == ["process_0-of-2.json", "process_1-of-2.json"]


def assert_trees_equal(a, b, what: str) -> None:
    import jax
    fa, fb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_leaves(b)
    assert len(fa) == len(fb), what
    for (k, x), y in zip(fa, fb):
        np.testing.assert_array_equal(x, y, err_msg=f"{what}: {jax.tree_util.keystr(k)}")


def test_two_process_run_resumes_exactly(runs):
    from dmfuse_jax.workdir import load_params
    assert runs["rcs"][3:5] == [0, 0], logs_of(runs, "resume2_0", "resume2_1")
    assert "resumed from" in runs["logs"]["resume2_0"] and "/checkpoints/2" in runs["logs"]["resume2_0"]
    root = runs["root"]
    for ema in (False, True):
        assert_trees_equal(load_params(root / "resume2", ema=ema), load_params(root / "multi", ema=ema),
                           f"2-process resumed vs uninterrupted (ema={ema})")


def test_two_process_checkpoint_resumes_on_one_process(runs):
    import jax

    from dmfuse_jax.workdir import load_params
    log = runs["logs"]["resume1"]
    assert runs["rcs"][5] == 0, log[-3000:]
    assert "resumed from" in log and "data position re-derived from step 2" in log, log[-3000:]
    root = runs["root"]
    # Steps 3-4 on one process from the 2-process state of step 2: as the 1-process run's steps 3-4.
    for ema in (False, True):
        a, b = load_params(root / "single", ema=ema), load_params(root / "resume1", ema=ema)
        for (k, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_leaves(b)):
            scale = 1e-3 + np.max(np.abs(x))
            assert np.max(np.abs(x - y)) / scale < 5e-4, f"{jax.tree_util.keystr(k)} (ema={ema}) differs"
