"""launch/: `local_cpu_processes.sh` really trains (two processes joined over loopback, two grain
workers each, a data folder with unreadable files whose global count is logged); every script's
dry run (DRY_RUN=1) prints, per host or process, a command the `dmfuse train` parser accepts.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import helpers as T

LAUNCH = T.REPO_ROOT / "launch"
TIMEOUT = int(os.environ.get("DMFUSE_TEST_TIMEOUT", "600"))  # seconds per run; raise on a loaded machine
SCRIPTS = ["local_cpu_processes.sh", "multihost.sh", "single_host.sh", "slurm_gpu.sbatch", "tpu_vm.sh"]


def accepted_by_train_cli(argv: list[str]):
    """Parses `dmfuse train` arguments with the real parser (unknown flags or values fail)."""
    from dmfuse_jax.commands import train

    parser = argparse.ArgumentParser(prog="dmfuse train", exit_on_error=False)
    train.add_arguments(parser)
    args, rest = parser.parse_known_args(argv)  # as cli.main does for a CONFIG_FLAGS command
    bad = [a for a in rest if not a.startswith("--config.")]
    assert not bad, f"arguments dmfuse train does not take: {bad}"
    args.config_flags = rest
    return args


def train_args(line: str) -> list[str]:
    """The arguments after `... train` in a printed command line."""
    words = shlex.split(line)
    return words[words.index("train") + 1:]


def dry_run(script: str, *args: str, env: dict | None = None) -> list[str]:
    cmd = (["bash"] if script.endswith(".sbatch") else []) + [str(LAUNCH / script), *args]
    proc = subprocess.run(cmd, env={**T.subprocess_env(), "DRY_RUN": "1", **(env or {})},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{script} dry run failed: {proc.stderr}"
    return proc.stdout.strip().splitlines()


OVERRIDES = ["--config.total_steps=3", "--config.data.root=/data/coco/train2017"]


def test_every_launcher_has_a_dry_run():
    for script in SCRIPTS:
        text = (LAUNCH / script).read_text()
        assert "DRY_RUN" in text, f"launch/{script} has no DRY_RUN mode"


@pytest.mark.parametrize("script,args,env,hosts", [
    ("single_host.sh", [], {}, 1),
    ("multihost.sh", [], {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
                          "JAX_PROCESS_ID": "3"}, 1),
    ("slurm_gpu.sbatch", [], {"SLURM_JOB_NUM_NODES": "3"}, 3),
    ("tpu_vm.sh", ["my-tpu", "us-central2-b"], {}, 1),
    ("local_cpu_processes.sh", ["2"], {"PORT": "12345"}, 2),
])
def test_dry_run_prints_each_hosts_command(script, args, env, hosts):
    lines = dry_run(script, *args, "configs/coco_pretrain.py", "/shared/W", *OVERRIDES, env=env)
    per_host = [l for l in lines if l.startswith(("process ", "every worker"))]
    assert len(per_host) == hosts, lines
    for line in per_host:
        parsed = accepted_by_train_cli(train_args(line.split(": ", 1)[1]))
        assert parsed.config == "configs/coco_pretrain.py" and parsed.workdir == "/shared/W"
        assert parsed.config_flags[-2:] == list(OVERRIDES), line
    if script == "multihost.sh":
        assert per_host[0].startswith("process 3: JAX_COORDINATOR_ADDRESS=10.0.0.1:1234 JAX_NUM_PROCESSES=4")
    if script == "slurm_gpu.sbatch":
        assert lines[0].startswith("srun ") and "--distributed on" in lines[0]
    if script == "tpu_vm.sh":
        assert lines[0].startswith("gcloud compute tpus tpu-vm ssh my-tpu --zone=us-central2-b --worker=all")
    if script == "local_cpu_processes.sh":
        assert [l.split(":")[0] for l in per_host] == ["process 0", "process 1"]
        assert all("JAX_COORDINATOR_ADDRESS=127.0.0.1:12345 JAX_NUM_PROCESSES=2" in l for l in per_host)


@pytest.mark.slow  # CI budget: two processes on loopback train in test_multiprocess; the dry runs stay
def test_local_cpu_processes_trains_with_two_processes_and_workers(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(6):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8)).save(images / f"img{i}a.png")
    (images / "img0b.png").write_bytes(b"not a png")
    (images / "img3b.png").write_bytes(b"not a png")
    work = tmp_path / "two_proc"
    overrides = T.TINY["pretrain"] + [f"data.root={images}", "data.worker_count=2", "total_steps=2",
                                      "checkpoint_every_steps=2", "log_every_steps=1"]
    env = T.subprocess_env(tmp_path / "xla_cache", DMFUSE=f"{sys.executable} -m dmfuse_jax",
                           DMFUSE_DISTRIBUTED_TIMEOUT="120")
    cmd = [str(LAUNCH / "local_cpu_processes.sh"), "2", T.PRETRAIN_CONFIG, str(work)]
    # Its own process group: a timeout stops the script and both training processes it started.
    proc = subprocess.Popen(cmd + [f"--config.{o}" for o in overrides], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=str(T.REPO_ROOT), start_new_session=True)
    try:
        proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    logs = {i: (tmp_path / f"two_proc.process_{i}.log").read_text() for i in range(2)}
    assert proc.returncode == 0, "\n".join(f"== process {i}\n{v[-2500:]}" for i, v in logs.items())
    assert "2 process(es)" in logs[0] and "done: 2 steps" in logs[0], logs[0][-2000:]
    data = work / "checkpoints" / "2" / "data"
    assert sorted(p.name for p in data.glob("*.json")) == ["process_0-of-2.json", "process_1-of-2.json"]

    # The logged count covers both processes and all their workers: compare with the data itself.
    from dmfuse_jax.data import pipeline as pl
    from dmfuse_jax.training.train import build_stage

    config = T.tiny_config("pretrain", [f"data.root={images}"])
    source, _ = build_stage(config).train_source(tmp_path)
    # No transform: the same order (all images are 20x24, so they batch as they are).
    serial = pl.train_dataset(source, None, seed=int(config.seed), global_batch=int(config.batch_size))
    per_step = [int(serial[s]["skipped"].sum()) for s in range(2)]
    assert sum(per_step) == 2  # 8 elements = one pass over the 8 files: each unreadable one passed over once
    logged = [json.loads(l).get("data/skipped_files") for l in (work / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(np.cumsum(per_step).astype(float)), f"logged {logged}, data {per_step}"
