"""Two processes joined by `jax.distributed.initialize` on loopback (CPU collectives via gloo) train
the tiny stage-1 config and end with the same params as one process on the same global batch.

Each process holds one CPU device and reads its own half of every global batch (grain sharding per
process); the 1-process run reads the whole batch. Both use the `dmfuse train` entry point.
"""
from __future__ import annotations

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


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess")
    env = T.subprocess_env(root / "xla_cache", DMFUSE_DISTRIBUTED_TIMEOUT="120")
    single = T.start_training("pretrain", root / "single", STEPS, env=env)
    port = free_port()
    procs = []
    for pid in range(2):
        penv = {**env, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
                "JAX_PROCESS_ID": str(pid)}
        procs.append(T.start_training("pretrain", root / "multi", STEPS, env=penv, log=root / f"multi_{pid}.log"))
    rcs = []
    for p in [single] + procs:
        try:
            rcs.append(p.wait(TIMEOUT))
        except Exception:
            for q in [single] + procs:
                q.kill()
            raise
    logs = {name: (root / f"{name}.log").read_text() for name in ("single", "multi_0", "multi_1")}
    return dict(root=root, rcs=rcs, logs=logs)


def test_two_processes_equal_one_process(runs):
    import jax

    from dmfuse_jax.training.checkpoint import load_params
    assert runs["rcs"] == [0, 0, 0], "\n\n".join(f"== {k}\n{v[-2500:]}" for k, v in runs["logs"].items())
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
