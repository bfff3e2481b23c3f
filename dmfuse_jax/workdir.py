"""A training workdir on disk, read without the trainer: its config.json (the one place a config is
compared with a run's), its checkpoints' content checksums, and its params (`load_params`, and the
best checkpoint's, `best_info` / `load_best_params`). Low in the house: inference imports it to fuse
from a workdir; orbax (and grain, for the readers' item handlers) are imported only when a
checkpoint is read.

A workdir holds:
  config.json            the full config, written atomically when the run starts
  checkpoints/<step>/    orbax items: 'weights' (params, frozen params, EMA), 'train' (step,
                         optimizer state, RNG), 'data' (the grain iterator, one JSON per process),
                         'integrity' (a 32-bit content hash of every array of 'weights' and 'train',
                         computed on device; see CHECKSUM), 'meta' (stage, step, the model/optimizer
                         config, the checksum's name and array names)
  best/<step>/           the best checkpoint's weights (`training/best.py`)
Writing them is `training/checkpoint.py` (the orbax Checkpointer) and `training/best.py`.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from dmfuse_jax.data.images import write_text_atomic
from dmfuse_jax.errors import UserError

BEST_DIR = "best"

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"

# What a checkpoint's arrays depend on: a resume with other values is refused (UserError).
RECORDED_CONFIG = ("stage", "model", "optimizer")
# Kernel choices: the same weights whichever runs.
NOT_COMPARED = ("model.unet.attention_impl", "model.head.caim_impl")

class CorruptCheckpointWarning(UserWarning):
    """A checkpoint failed its integrity check; an older one is used."""


class IntegrityError(Exception):
    """A checkpoint's files are missing, truncated or unreadable, or its arrays fail their checksums:
    the one failure that sets a checkpoint aside."""


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
# content checksums
#
# Per array, a 32-bit weighted sum of its bit pattern (as unsigned words), modulo 2**32:
#   h = sum (2 i + 1) w_i
# over the words w_i in C order. Every weight is odd, and odd numbers are invertible mod 2**32, so ANY
# change of one word (a flipped bit or byte) changes h for certain; other damage goes unseen with odds
# of about 2**-32 per array (as for crc32c). Integer sums are exact, so the value does not depend on
# the sharding or device count, and it is computed on the devices where the arrays live: no host
# copy, no sync at save time.
CHECKSUM = "wsum32"


@functools.cache
def _hashes_fn():
    """One jitted function for every save and restore (jit caches per tree layout): (N,) uint32,
    the content hashes of the leaves in `tree_leaves` order. Dispatched asynchronously."""
    import jax
    import jax.numpy as jnp

    from dmfuse_jax import compilation

    def words(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        if x.dtype == jnp.bool_:
            x = x.astype(jnp.uint8)
        size = x.dtype.itemsize
        if size == 8:
            return jax.lax.bitcast_convert_type(x, jnp.uint32)  # (..., 2)
        return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]).astype(jnp.uint32)

    def one(x):
        w = words(x)
        if w.ndim == 0:
            w = w[None]
        idx = jnp.zeros(w.shape, jnp.uint32)
        stride = 1
        for d in reversed(range(w.ndim)):  # the C-order position of each word, sharding-friendly
            idx = idx + jax.lax.broadcasted_iota(jnp.uint32, w.shape, d) * jnp.uint32(stride % 2**32)
            stride *= w.shape[d]
        return jnp.sum(w * (2 * idx + 1), dtype=jnp.uint32)

    def hashes(tree):
        leaves = jax.tree_util.tree_leaves(tree)
        if not leaves:
            return jnp.zeros((0,), jnp.uint32)
        return jnp.stack([one(x) for x in leaves])

    return compilation.jit(hashes)


def array_hashes(tree):
    """(N,) uint32 device array: the content hashes of every leaf of `tree` (sharded or not)."""
    return _hashes_fn()(tree)


def host_hashes(tree) -> np.ndarray:
    """`array_hashes` of a tree of host numpy arrays, in numpy (no compilation): the same values."""
    import jax

    out = []
    for x in jax.tree_util.tree_leaves(tree):
        x = np.ascontiguousarray(np.asarray(x))
        if x.dtype == np.bool_:
            x = x.astype(np.uint8)
        w = x.reshape(-1).view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}[x.dtype.itemsize])
        with np.errstate(over="ignore"):
            weights = 2 * np.arange(w.size, dtype=np.uint32) + 1
            out.append(np.dot(w.astype(np.uint32), weights) if w.size else np.uint32(0))
    return np.asarray(out, np.uint32).reshape(-1)


def leaf_names(tree) -> list[str]:
    import jax
    return [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def compare_hashes(names: list[str], got, expected, where: str) -> None:
    """IntegrityError naming the first array whose content hash differs from the recorded one."""
    got, expected = np.asarray(got, np.uint32), np.asarray(expected)
    if got.shape != expected.shape or len(names) != len(got):
        raise IntegrityError(f"{where}: {len(got)} arrays, {len(expected)} recorded checksums")
    for name, v, ref in zip(names, got, expected.astype(np.uint32)):
        if not np.array_equal(v, ref):
            raise IntegrityError(f"{where}: array {name} fails its content checksum (damaged bytes)")


# Read errors that mean a checkpoint's files are damaged: tensorstore's status for a missing file or
# array (NOT_FOUND), a file shorter than its index says (OUT_OF_RANGE), undecodable bytes (DATA_LOSS).
# Other statuses (UNAVAILABLE, PERMISSION_DENIED, RESOURCE_EXHAUSTED, INVALID_ARGUMENT, ...) are not.

_DAMAGE = re.compile(r"\b(NOT_FOUND|OUT_OF_RANGE|DATA_LOSS)\b")


# System failures while writing (a save): errno, or the text tensorstore / orbax put in their errors.

def is_damage(error: BaseException) -> bool:
    """Whether a read error (or one it was raised from) says the files are missing or damaged."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (IntegrityError, FileNotFoundError, json.JSONDecodeError, EOFError)):
            return True
        if _DAMAGE.search(f"{type(error).__name__}: {error}"):
            return True
        error = error.__cause__ or error.__context__
    return False


# ---------------------------------------------------------------------------------------------
# the config a checkpoint was trained with


def config_record(config) -> dict:
    """The keys of `config` a checkpoint depends on, as plain JSON (tuples become lists)."""
    out = {}
    for k in RECORDED_CONFIG:
        if k in config:
            v = config[k]
            out[k] = v.to_dict() if hasattr(v, "to_dict") else v
    return json.loads(json.dumps(out))


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


_ABSENT = "<absent>"


def config_differences(recorded: dict, config) -> list[str]:
    """'key: old when checkpointed, new now' for every recorded key whose value changed."""
    old, new = _flatten(recorded), _flatten(config_record(config))
    return [f"{k}: {json.dumps(old.get(k, _ABSENT))} when checkpointed, {json.dumps(new.get(k, _ABSENT))} now"
            for k in sorted(set(old) | set(new))
            if k not in NOT_COMPARED and old.get(k, _ABSENT) != new.get(k, _ABSENT)]


def check_config(recorded: dict, config, where: str) -> None:
    """UserError naming the differing keys when `config` is not the one `recorded` was trained with."""
    diff = config_differences(recorded, config)
    if diff:
        raise UserError(f"{where} was trained with another model/optimizer config; differing keys: "
                        f"{'; '.join(diff)}. No checkpoint was changed: resume with the original values, "
                        "or start a new --workdir")


# ---------------------------------------------------------------------------------------------
# the manager used by training

def settle_reads_before_closing_loops() -> None:
    """Makes orbax let every in-flight read finish before it closes its event loop.

    orbax runs each restore as `loop.run_until_complete(gather(reads))` on a fresh loop and closes it
    at once. When one read fails (a missing or truncated file), gather raises while the other reads
    are still running in tensorstore's threads; each then completes into the closed loop and prints
    `RuntimeError: Event loop is closed` (about one traceback per array, ~1,000 for a damaged
    checkpoint) plus 'Future exception was never retrieved'. Draining the loop's remaining tasks
    (their errors collected, not raised) before closing removes that at its origin; the first error
    is still the one raised. Installed once, for this process."""
    import asyncio

    from orbax.checkpoint._src import asyncio_utils

    current = getattr(asyncio_utils, "_run_sync_via_new_loop", None)
    if current is None or getattr(current, "_dmfuse_settles", False):
        return

    def run_sync_via_new_loop(coro):
        loop = asyncio.new_event_loop()
        try:
            asyncio.set_event_loop(loop)
            return loop.run_until_complete(coro)
        finally:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            asyncio.set_event_loop(None)
            loop.close()

    run_sync_via_new_loop._dmfuse_settles = True
    asyncio_utils._run_sync_via_new_loop = run_sync_via_new_loop

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

def check_checksum_kind(meta: dict, where: str) -> None:
    """UserError for a checkpoint written before content checksums (its sums cannot catch a flipped
    byte): not damage, so it is neither set aside nor silently trusted."""
    if meta.get("checksum") != CHECKSUM:
        raise UserError(f"{where}: written by an older dmfuse-jax without content checksums "
                        f"(checksum {meta.get('checksum', 'sum |x|')!r}, this version needs {CHECKSUM!r}); "
                        "no checkpoint was changed: train into a new --workdir")

def _restore_host_item(manager, step: int, item: str):
    """A small PyTree item as host numpy arrays on every process."""
    import jax
    import orbax.checkpoint as ocp

    with _quiet():
        meta_tree = manager.item_metadata(step)[item]
        tree = meta_tree.tree if hasattr(meta_tree, "tree") else meta_tree
        restore_args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        got = manager.restore(step, args=ocp.args.Composite(
            **{item: ocp.args.PyTreeRestore(restore_args=restore_args)}))
    return jax.tree.map(np.asarray, got[item])

# ---------------------------------------------------------------------------------------------
# reading a workdir's params


def assemble_params(weights: dict, ema: bool | None = None):
    """The model's params tree from a checkpoint's 'weights' item: the trained (or EMA) params,
    merged with the frozen ones (stage 2: {'unet': frozen, 'head': trained}). ema: None = the EMA
    params when the checkpoint has them, else the raw ones."""
    if ema is None:
        ema = weights.get("ema_params") is not None
    trained = weights["ema_params" if ema else "params"]
    frozen = weights.get("frozen") or {}
    return {**frozen, **trained} if frozen else trained


def load_params(workdir: str | os.PathLike, ema: bool | None = None, step: int | None = None):
    """Params (or EMA params) of a workdir's latest valid checkpoint, as a pytree of numpy arrays.
    ema: None (default) = the EMA params when the checkpoint has them, else the raw ones (as
    `dmfuse_jax.load` and `dmfuse fuse`); True / False: EMA / raw.

    Stage 'fusion': the full DMFuse tree {'unet': ..., 'head': ...}; stage 'pretrain': the UNet tree.
    A newest checkpoint that fails its integrity check is skipped with a `CorruptCheckpointWarning`
    (nothing is moved); other errors are raised. `step` picks one.
    """

    load_workdir_config(workdir)  # is a workdir
    directory = Path(workdir) / CHECKPOINT_DIR
    if not directory.is_dir():
        raise UserError(f"{directory}: no checkpoints in {workdir}")
    manager = reader_manager(directory)
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
                where = str(directory / str(s))
                check_checksum_kind(meta, where)
                names = meta.get("checksum_names", {}).get("weights")
                if names != leaf_names(weights):
                    raise IntegrityError(f"{where}/weights: arrays differ from the recorded ones")
                compare_hashes(names, host_hashes(weights), _restore_host_item(manager, s, "integrity")["weights"],
                               f"{where}/weights")
            except Exception as e:  # noqa: BLE001 - classified: only damage is skipped
                if not is_damage(e) or isinstance(e, UserError):
                    raise
                errors.append(f"step {s}: {type(e).__name__}: {str(e)[:200]}")
                warnings.warn(f"checkpoint {directory / str(s)} is corrupt ({errors[-1]}); "
                              "trying the previous one", CorruptCheckpointWarning, stacklevel=2)
                continue
            return assemble_params(weights, ema)
        raise UserError(f"{directory}: no readable checkpoint:\n  " + "\n  ".join(errors))
    finally:
        manager.close()


def _restore_numpy(manager, step: int):
    """(weights as host numpy, meta) of one step."""
    import orbax.checkpoint as ocp

    weights = _restore_host_item(manager, step, "weights")
    with _quiet():
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    return weights, meta

def reader_manager(directory: Path):
    """A read-only orbax CheckpointManager over a workdir's checkpoints/ (no save policy; every
    item's handler named, so item metadata can be read)."""
    import grain
    import orbax.checkpoint as ocp

    settle_reads_before_closing_loops()
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    handlers = {"weights": ocp.PyTreeCheckpointHandler(), "train": ocp.PyTreeCheckpointHandler(),
                "integrity": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler()}
    with _quiet():
        return ocp.CheckpointManager(directory.resolve(), options=options, item_handlers=handlers)


def best_manager(directory: Path, mode: str, read_only: bool = False):
    """The orbax CheckpointManager of WORKDIR/best/ (`training/best.py` writes through it)."""
    import orbax.checkpoint as ocp

    settle_reads_before_closing_loops()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else 1, best_fn=lambda m: float(m["value"]), best_mode=mode,
        keep_checkpoints_without_metrics=False, create=not read_only, read_only=read_only,
        save_interval_steps=0 if read_only else 1, enable_async_checkpointing=not read_only)
    handlers = {"weights": ocp.PyTreeCheckpointHandler() if read_only else ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler()}
    with _quiet():  # orbax's "directory is read only" note
        return ocp.CheckpointManager(directory.resolve(), options=options, item_handlers=handlers)


def best_info(workdir) -> dict | None:
    """{'step', 'metric', 'mode', 'value'} of a workdir's best checkpoint, or None."""
    import orbax.checkpoint as ocp

    directory = Path(workdir) / BEST_DIR
    if not directory.is_dir():
        return None
    mgr = best_manager(directory, "max", read_only=True)
    try:
        step = mgr.best_step()
        if step is None:
            return None
        with _quiet():
            meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        return {k: meta[k] for k in ("step", "metric", "mode", "value")}
    finally:
        mgr.close()


def load_best_params(workdir, ema: bool | None = None):
    """The params (or EMA params) of a workdir's best checkpoint, as numpy (the shape of
    `checkpoint.load_params`; ema: None = EMA when it has them, as there), after checking their
    checksums. UserError when there is none."""
    import orbax.checkpoint as ocp

    load_workdir_config(workdir)
    directory = Path(workdir) / BEST_DIR
    steps = []
    mgr = best_manager(directory, "max", read_only=True) if directory.is_dir() else None
    try:
        steps = sorted(mgr.all_steps()) if mgr is not None else []
        if not steps:
            raise UserError(f"{directory}: no best checkpoint in {workdir} (set config.checkpoint.best.metric "
                            "to an eval of config.evals when training)")
        step = mgr.best_step() or steps[-1]
        weights = _restore_host_item(mgr, step, "weights")
        with _quiet():
            meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        try:
            where = str(directory / str(step))
            check_checksum_kind(meta, where)
            if meta.get("checksum_names") != leaf_names(weights):
                raise ValueError(f"{where}/weights: arrays differ from the recorded ones")
            compare_hashes(meta["checksum_names"], host_hashes(weights), meta["checksums"], f"{where}/weights")
        except Exception as e:  # noqa: BLE001 - damaged best checkpoint: say so, never fall back silently
            raise UserError(f"{directory / str(step)}: the best checkpoint fails its check: {e}") from None
        return assemble_params(weights, ema), step
    finally:
        if mgr is not None:
            mgr.close()
