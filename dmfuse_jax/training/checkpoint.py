"""Checkpoints (orbax) of a training workdir, and reading them back (`load_params`).

A workdir holds:
  config.json            the full config, written atomically when the run starts
  checkpoints/<step>/    orbax items: 'weights' (params, frozen params, EMA), 'train' (step,
                         optimizer state, RNG), 'data' (the grain iterator, one JSON per process),
                         'meta' (stage, step and a checksum per weight array)
Saves are asynchronous, every `checkpoint_every_steps`, keeping the last `keep_checkpoints`, plus one
on SIGTERM/SIGINT (preemption). orbax commits a step atomically, so a save torn by a crash is not
listed; a committed step whose files are damaged fails to restore or fails its checksum, and the run
falls back to the previous step with a warning.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from dmfuse_jax.data.images import write_text_atomic
from dmfuse_jax.errors import UserError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "corrupt_checkpoints"
ITEMS = ("weights", "train", "data", "meta")


class CorruptCheckpointWarning(UserWarning):
    """A checkpoint could not be restored or failed its checksum; an older one is used."""


# ---------------------------------------------------------------------------------------------
# config.json


def write_config(workdir: str | os.PathLike, config) -> None:
    """Dumps the full ConfigDict as JSON, atomically (process 0 only in multi-process runs)."""
    write_text_atomic(Path(workdir) / CONFIG_FILE, config.to_json(indent=2, sort_keys=True) + "\n")


def load_workdir_config(workdir: str | os.PathLike):
    """The ConfigDict a training run in `workdir` was started with."""
    from dmfuse_jax.config_lib import config_from_json

    path = Path(workdir) / CONFIG_FILE
    if not Path(workdir).is_dir():
        raise UserError(f"{workdir}: no such training workdir")
    if not path.is_file():
        raise UserError(f"{path}: missing: {workdir} is not a training workdir (no config.json)")
    try:
        return config_from_json(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable config: {e}") from None


# ---------------------------------------------------------------------------------------------
# checksums


def weight_checksums(weights) -> dict[str, float]:
    """Sum of |x| per array (float64 on the host after a float32 sum on device), keyed by path."""
    import jax
    import jax.numpy as jnp

    flat, _ = jax.tree_util.tree_flatten_with_path(weights)
    sums = jax.jit(lambda leaves: [jnp.sum(jnp.abs(x.astype(jnp.float32))) for x in leaves])(
        [x for _, x in flat])
    return {jax.tree_util.keystr(k): float(v) for (k, _), v in zip(flat, jax.device_get(sums))}


def verify_checksums(weights, expected: dict[str, float], where: str) -> None:
    import jax

    flat, _ = jax.tree_util.tree_flatten_with_path(weights)
    got = {jax.tree_util.keystr(k): float(np.sum(np.abs(np.asarray(x, np.float64)))) for k, x in flat}
    if set(got) != set(expected):
        raise ValueError(f"{where}: arrays differ from the recorded ones")
    for k, v in got.items():
        ref = expected[k]
        if not np.isfinite(v) or abs(v - ref) > 1e-4 * abs(ref) + 1e-6:
            raise ValueError(f"{where}: checksum mismatch for {k}: {v} vs recorded {ref}")


# ---------------------------------------------------------------------------------------------
# the manager used by training


def _manager(directory: Path, *, every: int = 1, keep: int | None = None, read_only: bool = False,
             async_save: bool = True):
    import orbax.checkpoint as ocp

    if read_only:  # readers: no save policy; handlers named so item metadata can be read
        import grain
        options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
        handlers = {"weights": ocp.PyTreeCheckpointHandler(), "train": ocp.PyTreeCheckpointHandler(),
                    "meta": ocp.JsonCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()}
        with _quiet():
            return ocp.CheckpointManager(directory.resolve(), options=options, item_handlers=handlers)
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(1, int(every)), max_to_keep=keep,
        create=True, enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(directory.resolve(), options=options, item_names=ITEMS)


class _quiet:
    """Silences orbax's informational absl warnings and its restore-without-sharding warning (we
    restore to host numpy on purpose)."""

    def __enter__(self):
        self._absl = logging.getLogger("absl")
        self._level = self._absl.level
        self._absl.setLevel(logging.ERROR)
        self._warn = warnings.catch_warnings()
        self._warn.__enter__()
        warnings.filterwarnings("ignore", message="Sharding info not provided")
        return self

    def __exit__(self, *exc):
        self._warn.__exit__(*exc)
        self._absl.setLevel(self._level)
        return False


def _with_shardings(abstract, shardings):
    import jax
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


class Checkpointer:
    """Saves and restores a `TrainState` plus the grain iterator of one run."""

    def __init__(self, workdir: str | os.PathLike, *, every: int, keep: int | None = 3,
                 stage: str = "", async_save: bool = True):
        self.workdir = Path(workdir)
        self.directory = self.workdir / CHECKPOINT_DIR
        self.stage = stage
        self.every = max(1, int(every))
        self.manager = _manager(self.directory, every=every, keep=keep, async_save=async_save)

    def save(self, step: int, state, data_iter, *, force: bool = False) -> bool:
        """Starts an async save at `step` if due (or `force`); returns whether one was started."""
        import grain
        import orbax.checkpoint as ocp

        # Our policy, not orbax's (which also saves the first step it sees): every `every` steps.
        if (not force and step % self.every) or step in self.manager.all_steps():
            return False
        weights, rest = state.split_items()
        meta = {"step": int(step), "stage": self.stage, "checksums": weight_checksums(weights)}
        return self.manager.save(step, force=True, args=ocp.args.Composite(
            weights=ocp.args.StandardSave(weights), train=ocp.args.StandardSave(rest),
            data=grain.checkpoint.CheckpointSave(data_iter), meta=ocp.args.JsonSave(meta)))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore_latest(self, abstract_state, shardings, data_iter):
        """The newest checkpoint that restores and passes its checksums, as (state, step), with the
        iterator's position restored in place; None when there is none. Broken newer ones are moved
        to `corrupt_checkpoints/` (so the run can save those steps again) with a warning."""
        import grain
        import jax
        import orbax.checkpoint as ocp

        from dmfuse_jax.training.state import TrainState

        weights_abs, rest_abs = abstract_state.split_items()
        weights_sh, rest_sh = shardings.split_items()
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                got = self.manager.restore(step, args=ocp.args.Composite(
                    weights=ocp.args.StandardRestore(_with_shardings(weights_abs, weights_sh)),
                    train=ocp.args.StandardRestore(_with_shardings(rest_abs, rest_sh)),
                    meta=ocp.args.JsonRestore()))
                verify_checksums(jax.device_get(got["weights"]), got["meta"]["checksums"],
                                 f"{self.directory / str(step)}")
                self.manager.restore(step, args=ocp.args.Composite(
                    data=grain.checkpoint.CheckpointRestore(data_iter)))
            except Exception as e:  # noqa: BLE001 - any failure means: not usable, try the previous
                self._quarantine(step, e)
                continue
            return TrainState.from_items(got["weights"], got["train"]), step
        return None

    def _quarantine(self, step: int, error: Exception) -> None:
        import jax

        src = self.directory / str(step)
        dst = self.workdir / CORRUPT_DIR / str(step)
        warnings.warn(f"checkpoint {src} is corrupt ({type(error).__name__}: {str(error)[:300]}); "
                      f"moved to {dst}, falling back to the previous checkpoint",
                      CorruptCheckpointWarning, stacklevel=3)
        if jax.process_index() == 0:
            dst.parent.mkdir(parents=True, exist_ok=True)
            if dst.exists():
                import shutil
                shutil.rmtree(dst)
            os.replace(src, dst)
        _sync("dmfuse_quarantine")
        self.manager.reload()

    def reached_preemption(self, step: int) -> bool:
        return bool(self.manager.reached_preemption(step))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _sync(name: str) -> None:
    import jax
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


# ---------------------------------------------------------------------------------------------
# preemption


class PreemptionWatch:
    """SIGTERM / SIGINT set a flag that the training loop checks once per step (cheap: no device
    sync); the loop then saves a checkpoint and exits. A second SIGINT interrupts at once.
    In multi-process runs SIGTERM is left to JAX's preemption notifier, which all processes agree
    on through the coordination service (`Checkpointer.reached_preemption`)."""

    def __init__(self, multiprocess: bool = False):
        self.multiprocess = multiprocess
        self.signal_name: str | None = None
        self._old: dict[int, Any] = {}

    def _handler(self, signum, frame):
        if signum == signal.SIGINT and self.signal_name == "SIGINT":
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            sigs = [signal.SIGINT] + ([] if self.multiprocess else [signal.SIGTERM])
            for s in sigs:
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False

    def requested(self, step: int, checkpointer: Checkpointer | None = None) -> bool:
        if self.signal_name is not None:
            return True
        if self.multiprocess and checkpointer is not None and checkpointer.reached_preemption(step):
            self.signal_name = "preemption notice"
            return True
        return False


# ---------------------------------------------------------------------------------------------
# reading a workdir's params


def assemble_params(weights: dict, ema: bool = False):
    """The model's params tree from a checkpoint's 'weights' item: the trained (or EMA) params,
    merged with the frozen ones (stage 2: {'unet': frozen, 'head': trained})."""
    trained = weights["ema_params" if ema else "params"]
    frozen = weights.get("frozen") or {}
    return {**frozen, **trained} if frozen else trained


def load_params(workdir: str | os.PathLike, ema: bool = False, step: int | None = None):
    """Params (or EMA params) of a workdir's latest valid checkpoint, as a pytree of numpy arrays.

    Stage 'fusion': the full DMFuse tree {'unet': ..., 'head': ...}; stage 'pretrain': the UNet tree.
    A corrupt newest checkpoint is skipped with a `CorruptCheckpointWarning`. `step` picks one.
    """
    load_workdir_config(workdir)  # is a workdir
    directory = Path(workdir) / CHECKPOINT_DIR
    if not directory.is_dir():
        raise UserError(f"{directory}: no checkpoints in {workdir}")
    manager = _manager(directory, read_only=True)
    try:
        steps = sorted(manager.all_steps(), reverse=True)
        if step is not None:
            if step not in steps:
                raise UserError(f"{directory}: no checkpoint at step {step} (have {sorted(steps)})")
            steps = [step]
        if not steps:
            raise UserError(f"{directory}: no checkpoints in {workdir}")
        errors = []
        for s in steps:
            try:
                weights, meta = _restore_numpy(manager, s)
                verify_checksums(weights, meta["checksums"], str(directory / str(s)))
            except Exception as e:  # noqa: BLE001 - unusable: try the previous one
                errors.append(f"step {s}: {type(e).__name__}: {str(e)[:200]}")
                warnings.warn(f"checkpoint {directory / str(s)} is corrupt ({errors[-1]}); "
                              "trying the previous one", CorruptCheckpointWarning, stacklevel=2)
                continue
            return assemble_params(weights, ema)
        raise UserError(f"{directory}: no readable checkpoint:\n  " + "\n  ".join(errors))
    finally:
        manager.close()


def _restore_numpy(manager, step: int):
    import jax
    import orbax.checkpoint as ocp

    with _quiet():
        meta_tree = manager.item_metadata(step)["weights"]
        tree = meta_tree.tree if hasattr(meta_tree, "tree") else meta_tree
        restore_args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        got = manager.restore(step, args=ocp.args.Composite(
            weights=ocp.args.PyTreeRestore(restore_args=restore_args), meta=ocp.args.JsonRestore()))
    weights = jax.tree.map(np.asarray, got["weights"])
    return weights, got["meta"]
