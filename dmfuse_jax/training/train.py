"""Training a stage from a config: the stage registry, the workdir's preparation and lock, the device
check and `train(config, workdir)`, which `dmfuse train` (`commands/train.py`) calls.

Before anything is written: the config's values are checked (`config_lib.validate_config`, and the
mesh against the devices), then the workdir is locked (`lock.py`: one writer per workdir; process 0
holds it).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from dmfuse_jax.errors import UserError

# config.stage -> (module, class). Registry: a new stage is a new row.
STAGES: dict[str, tuple[str, str]] = {
    "pretrain": ("dmfuse_jax.training.pretrain", "PretrainStage"),
    "fusion": ("dmfuse_jax.training.fusion", "FusionStage"),
}

REQUIRED_KEYS = ("seed", "batch_size", "total_steps", "checkpoint_every_steps", "stage")


def build_stage(config):
    import importlib

    name = config.get("stage")
    if name not in STAGES:
        raise UserError(f"config.stage is {name!r}; expected one of {sorted(STAGES)}")
    module, cls = STAGES[name]
    return getattr(importlib.import_module(module), cls)(config)


def initialize_distributed(mode: str = "auto") -> None:
    """jax.distributed.initialize, with the coordinator from the environment (JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES, JAX_PROCESS_ID) or, with mode 'on', from cluster auto-detection."""
    import jax

    if mode == "off":
        return
    addr = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not addr and mode != "on":
        return
    # CPU-only multi-process runs need host collectives (harmless on GPU / TPU).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    timeout = int(os.environ.get("DMFUSE_DISTRIBUTED_TIMEOUT", "300"))
    if addr:
        try:
            n, pid = int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"])
        except (KeyError, ValueError):
            raise UserError("JAX_COORDINATOR_ADDRESS is set: also set JAX_NUM_PROCESSES and JAX_PROCESS_ID "
                            "(integers)") from None
        jax.distributed.initialize(coordinator_address=addr, num_processes=n, process_id=pid,
                                   initialization_timeout=timeout)
    else:
        jax.distributed.initialize(initialization_timeout=timeout)


def prepare_workdir(config, workdir: str) -> None:
    """Creates the workdir and writes config.json (process 0). A workdir with checkpoints whose
    recorded model / optimizer config differs is refused (UserError naming the keys) before anything
    is written; other changes (steps, data, logging) are recorded with a warning."""
    import jax

    from dmfuse_jax.workdir import CHECKPOINT_DIR, CONFIG_FILE, check_config, config_record, load_workdir_config, write_config

    path = os.path.join(workdir, CONFIG_FILE)
    if os.path.isfile(path):
        old = load_workdir_config(workdir)
        if any(p.name.isdigit() for p in Path(workdir, CHECKPOINT_DIR).glob("*")):
            check_config(config_record(old), config, f"{workdir} (its {CONFIG_FILE})")
        if old.to_json(sort_keys=True) != config.to_json(sort_keys=True) and jax.process_index() == 0:
            logging.getLogger(__name__).warning("%s: the config differs from the one this workdir was "
                                                "started with; the new one is recorded", path)
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        write_config(workdir, config)


def check_devices(config) -> None:
    """The mesh shape against this run's devices, and the global batch against the mesh (UserError)."""
    from dmfuse_jax import sharding as shd

    mesh = shd.make_mesh(tuple(config.sharding.mesh_shape)) if "sharding" in config else shd.make_mesh()
    shd.check_batch(int(config.batch_size), mesh)


def lock_workdir(workdir: str):
    """The workdir's lock (`lock.WorkdirLock`), taken by process 0; every process learns whether it
    was taken, so a refused run stops everywhere (UserError). -> the lock (None on other processes)."""
    import jax

    from dmfuse_jax.training.lock import WorkdirLock

    lock, error = None, None
    if jax.process_index() == 0:
        try:
            lock = WorkdirLock(workdir).acquire()
        except UserError as e:
            error = e
    if jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils
        if not int(multihost_utils.broadcast_one_to_all(np.int32(error is None))):
            raise error or UserError(f"{workdir}: process 0 could not lock the workdir (see its output)")
    elif error is not None:
        raise error
    return lock


def train(config, workdir: str) -> dict:
    """Library entry point: trains `config` in `workdir` (resumes if it has checkpoints).
    Checks the config and the devices, then locks the workdir, before anything is written."""
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise UserError(f"training config lacks the keys {missing}")
    from dmfuse_jax.config_lib import validate_config
    from dmfuse_jax.data.images import check_output_path
    from dmfuse_jax.training.trainer import fit

    validate_config(config)
    check_devices(config)
    check_output_path(workdir, "workdir", folder=True)
    stage = build_stage(config)
    lock = lock_workdir(workdir)
    try:
        prepare_workdir(config, workdir)
        return fit(config, workdir, stage)
    finally:
        if lock is not None:
            lock.release()
