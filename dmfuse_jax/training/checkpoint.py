"""Checkpoints (orbax) of a training workdir, and reading them back (`load_params`).

A workdir holds:
  config.json            the full config, written atomically when the run starts
  checkpoints/<step>/    orbax items: 'weights' (params, frozen params, EMA), 'train' (step,
                         optimizer state, RNG), 'data' (the grain iterator, one JSON per process),
                         'integrity' (a 32-bit content hash of every array of 'weights' and 'train',
                         computed on device; see CHECKSUM), 'meta' (stage, step, the model/optimizer
                         config, the checksum's name and array names)
Saves are asynchronous, every `checkpoint_every_steps`, keeping the last `keep_checkpoints`, plus one
on SIGTERM/SIGINT (preemption). orbax commits a step atomically, so a save torn by a crash is not
listed.

Restoring never loses work:
  - only a failed integrity check (a missing, truncated or unreadable file, or a content checksum
    mismatch: one flipped byte is enough) counts as corruption: that step is moved to `corrupt_checkpoints/` (never deleted) and the
    previous one is tried; the run prints which step it resumed from;
  - a different model / optimizer config (or stage) is a `UserError` naming the differing keys;
  - a different process count restores params and optimizer state and re-derives every process's
    data position from the step (the global batch at step k does not depend on the process count);
  - any other failure (I/O, out of memory, ...) is raised as it is; no checkpoint is touched.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import os
import re
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from dmfuse_jax.data.images import write_text_atomic
from dmfuse_jax.errors import SaveFailed, UserError

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "corrupt_checkpoints"
ITEMS = ("weights", "train", "data", "meta", "integrity")
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
_SYSTEM_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                  errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                  errno.EROFS: "read-only filesystem", errno.EIO: "I/O error"}
_SYSTEM_TEXT = re.compile(r"No space left on device|Disk quota exceeded|Permission denied|"
                          r"Operation not permitted|Read-only file system|Input/output error")


def system_failure(error: BaseException) -> str | None:
    """A short reason when a save error (or one it was raised from) is a system failure: disk full,
    quota, permission, read-only filesystem, I/O error; else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _SYSTEM_ERRNOS:
            where = f" ({error.filename})" if error.filename else ""
            return _SYSTEM_ERRNOS[error.errno] + where
        m = _SYSTEM_TEXT.search(str(error))
        if m:
            return m.group(0)
        error = error.__cause__ or error.__context__
    return None


class _ReportedSystemFailures(logging.Filter):
    """Drops the ERROR records orbax's background save threads (absl) and asyncio's 'Task exception
    was never retrieved' print for a system failure (disk full, quota, permission, I/O): about 60
    tracebacks for one full disk, while the run reports that failure itself as one line (SaveFailed).
    Every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and system_failure(error) is not None:
            return False
        return _SYSTEM_TEXT.search(record.getMessage()) is None


_REPORTED = _ReportedSystemFailures()


def quiet_reported_system_failures() -> None:
    """Installs `_ReportedSystemFailures` on the absl and asyncio loggers (once)."""
    for name in ("absl", "asyncio"):
        logger = logging.getLogger(name)
        if _REPORTED not in logger.filters:
            logger.addFilter(_REPORTED)


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


def _manager(directory: Path, *, every: int = 1, keep: int | None = None, read_only: bool = False,
             async_save: bool = True):
    import orbax.checkpoint as ocp

    settle_reads_before_closing_loops()

    if read_only:  # readers: no save policy; handlers named so item metadata can be read
        import grain
        options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
        handlers = {"weights": ocp.PyTreeCheckpointHandler(), "train": ocp.PyTreeCheckpointHandler(),
                    "integrity": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler(),
                    "data": grain.checkpoint.CheckpointHandler()}
        with _quiet():
            return ocp.CheckpointManager(directory.resolve(), options=options, item_handlers=handlers)
    import grain
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(1, int(every)), max_to_keep=keep,
        create=True, enable_async_checkpointing=async_save)
    # Handlers fixed per item (not inferred from the first call, which may be a restore).
    handlers = {"weights": ocp.StandardCheckpointHandler(), "train": ocp.StandardCheckpointHandler(),
                "integrity": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler()}
    return ocp.CheckpointManager(directory.resolve(), options=options, item_handlers=handlers)


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
    """Saves and restores a `TrainState` plus the grain iterator of one run (`config`: the run's
    config; its `RECORDED_CONFIG` part is stored in every checkpoint and checked on restore)."""

    def __init__(self, workdir: str | os.PathLike, *, every: int, keep: int | None = 3,
                 stage: str = "", async_save: bool = True, config=None):
        self.workdir = Path(workdir)
        self.directory = self.workdir / CHECKPOINT_DIR
        self.stage = stage
        self.config = config
        self.every = max(1, int(every))
        quiet_reported_system_failures()  # a failed save is reported once, as SaveFailed
        self.manager = _manager(self.directory, every=every, keep=keep, async_save=async_save)

    def save(self, step: int, state, data_iter, *, force: bool = False) -> bool:
        """Starts an async save at `step` if due (or `force`); returns whether one was started.
        The content hashes are device arrays saved with the state: no host sync here."""
        # Our policy, not orbax's (which also saves the first step it sees): every `every` steps.
        if (not force and step % self.every) or step in self.manager.all_steps():
            return False
        with self._system_failures(step):
            return self._save(step, state, data_iter)

    def due(self, step: int) -> bool:
        """Whether `save(step, ...)` would save (without force); cheap, no file listing."""
        return step % self.every == 0

    @contextlib.contextmanager
    def _system_failures(self, step: int | None):
        """Turns a disk-full / quota / permission / I/O error of a save (raised now, or by the
        background write of an earlier one) into one line (SaveFailed, exit 1)."""
        try:
            yield
        except Exception as error:  # noqa: BLE001 - classified: only system failures become one line
            reason = system_failure(error)
            if reason is None:
                raise
            try:
                latest = self.manager.latest_step()
            except Exception:  # noqa: BLE001 - only for the message
                latest = None
            raise SaveFailed(
                f"saving checkpoints in {self.directory} failed{'' if step is None else f' at step {step}'}: {reason}; "
                f"the checkpoints committed before it are intact (latest: "
                f"{'none' if latest is None else f'step {latest}'}); fix that and run the same command to "
                "resume") from None

    def _save(self, step: int, state, data_iter) -> bool:
        import grain
        import jax
        import orbax.checkpoint as ocp
        weights, rest = state.split_items()
        meta = {"step": int(step), "stage": self.stage,
                "config": config_record(self.config) if self.config is not None else None,
                "process_count": jax.process_count(), "device_count": jax.device_count(),
                "checksum": CHECKSUM,
                "checksum_names": {"weights": leaf_names(weights), "train": leaf_names(rest)}}
        integrity = {"weights": array_hashes(weights), "train": array_hashes(rest)}
        return self.manager.save(step, force=True, args=ocp.args.Composite(
            weights=ocp.args.StandardSave(weights), train=ocp.args.StandardSave(rest),
            integrity=ocp.args.PyTreeSave(integrity),  # PyTree: read back as host numpy (_restore_host_item)
            data=grain.checkpoint.CheckpointSave(data_iter), meta=ocp.args.JsonSave(meta)))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore_latest(self, abstract_state, shardings, data_iter):
        """The newest checkpoint that passes its integrity check, as (state, step), with the
        iterator's position restored in place; None when there is none. A newer one that fails
        the check is moved to `corrupt_checkpoints/` (so the run can save that step again) with a
        warning. A config change raises UserError; any other error is raised; both leave every
        checkpoint where it is."""
        from dmfuse_jax.training.state import TrainState

        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                weights, rest = self._restore_checked(step, abstract_state, shardings)
                self._restore_data(step, data_iter)
            except Exception as e:  # noqa: BLE001 - classified: only damage is set aside
                if not is_damage(e) or isinstance(e, UserError):
                    if not isinstance(e, UserError):
                        e.add_note(f"restoring {self.directory / str(step)} failed (not a damaged file): "
                                   "no checkpoint was moved; fix the cause and run again")
                    raise
                self._quarantine(step, e)
                continue
            return TrainState.from_items(weights, rest), step
        return None

    def _restore_checked(self, step: int, abstract_state, shardings):
        """(weights, train) of `step` with their shardings, after the config check; IntegrityError
        (or a read error that `is_damage`) when the files or checksums are bad."""
        import orbax.checkpoint as ocp

        where = str(self.directory / str(step))
        step_dir = self.directory / str(step)
        missing = [i for i in ("weights", "train", "meta") if not (step_dir / i).is_dir()]
        if missing:
            raise IntegrityError(f"{where}: missing {', '.join(missing)}")
        with _quiet():
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if not isinstance(meta, dict):
            raise IntegrityError(f"{where}/meta: unreadable")
        if meta.get("stage", self.stage) != self.stage:
            raise UserError(f"{where} is a {meta.get('stage')!r} checkpoint; this run trains stage "
                            f"{self.stage!r}. No checkpoint was changed: use another --workdir")
        if self.config is not None and meta.get("config") is not None:
            check_config(meta["config"], self.config, where)
        weights_abs, rest_abs = abstract_state.split_items()
        weights_sh, rest_sh = shardings.split_items()
        got = self.manager.restore(step, args=ocp.args.Composite(
            weights=ocp.args.StandardRestore(_with_shardings(weights_abs, weights_sh)),
            train=ocp.args.StandardRestore(_with_shardings(rest_abs, rest_sh))))
        self._verify(step, meta, got["weights"], got["train"])
        return got["weights"], got["train"]

    def _verify(self, step: int, meta: dict, weights, rest) -> None:
        """Content hashes recomputed on device (the arrays may span processes) against the recorded ones."""
        import jax
        where = str(self.directory / str(step))
        check_checksum_kind(meta, where)
        if not (self.directory / str(step) / "integrity").is_dir():
            raise IntegrityError(f"{where}: missing integrity")
        saved = _restore_host_item(self.manager, step, "integrity")
        for item, tree in (("weights", weights), ("train", rest)):
            names = meta.get("checksum_names", {}).get(item)
            if names != leaf_names(tree):
                raise IntegrityError(f"{where}/{item}: arrays differ from the recorded ones")
            compare_hashes(names, jax.device_get(array_hashes(tree)), saved[item], f"{where}/{item}")

    def _restore_data(self, step: int, data_iter) -> None:
        """The iterator's position: grain's own state when this run has the process count that
        wrote the checkpoint; otherwise re-derived from the step (one global batch per step)."""
        import grain
        import jax
        import orbax.checkpoint as ocp

        data_dir = self.directory / str(step) / "data"
        written = sorted(data_dir.glob("process_*-of-*.json"))
        if not written:
            raise IntegrityError(f"{data_dir}: missing iterator state")
        counts = {int(m.group(1)) for p in written if (m := re.search(r"-of-(\d+)\.json$", p.name))}
        if counts == {jax.process_count()}:
            self.manager.restore(step, args=ocp.args.Composite(
                data=grain.checkpoint.CheckpointRestore(data_iter)))
            return
        set_data_position(data_iter, step, written, where=str(data_dir))
        if jax.process_index() == 0:
            print(f"{data_dir}: written by {sorted(counts)} process(es), this run has "
                  f"{jax.process_count()}: data position re-derived from step {step}", flush=True)

    def _quarantine(self, step: int, error: Exception) -> None:
        import jax

        src = self.directory / str(step)
        dst = self.workdir / CORRUPT_DIR / str(step)
        if dst.exists():  # a step set aside before and saved again: keep both
            dst = dst.with_name(f"{step}.{int(time.time())}")
        warnings.warn(f"checkpoint {src} failed its integrity check ({type(error).__name__}: "
                      f"{str(error)[:300]}); moved to {dst}, trying the previous checkpoint",
                      CorruptCheckpointWarning, stacklevel=3)
        if jax.process_index() == 0:
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
        _sync("dmfuse_quarantine")
        self.manager.reload()

    def reached_preemption(self, step: int) -> bool:
        return bool(self.manager.reached_preemption(step))

    def wait(self) -> None:
        with self._system_failures(None):
            self.manager.wait_until_finished()

    def close(self) -> None:
        with self._system_failures(None):
            self.manager.wait_until_finished()
        self.manager.close()

    def abandon(self) -> None:
        """On a failure: lets saves already started finish (they hold finite states), starts none, and
        closes without raising (the original error is the one to report)."""
        try:
            self.manager.wait_until_finished()
        except Exception:  # noqa: BLE001 - the failure being raised matters, not a second one
            pass
        try:
            self.manager.close()
        except Exception:  # noqa: BLE001
            pass


def check_checksum_kind(meta: dict, where: str) -> None:
    """UserError for a checkpoint written before content checksums (its sums cannot catch a flipped
    byte): not damage, so it is neither set aside nor silently trusted."""
    if meta.get("checksum") != CHECKSUM:
        raise UserError(f"{where}: written by an older dmfuse-jax without content checksums "
                        f"(checksum {meta.get('checksum', 'sum |x|')!r}, this version needs {CHECKSUM!r}); "
                        "no checkpoint was changed: train into a new --workdir")


def set_data_position(data_iter, step: int, written: list[Path], where: str) -> None:
    """Puts an iterator of this run at global batch `step` (the pipeline reads global batch k at
    step k whatever the process count), after checking that the recorded positions say the same."""
    fresh = data_iter.get_state()
    if not (isinstance(fresh, dict) and set(fresh) == {"next_index"}):
        raise UserError(f"{where}: written by another process count, and the position of this iterator "
                        f"(data.worker_count > 0) cannot be re-derived; resume once with the process count "
                        f"that wrote it, or with data.worker_count=0")
    for path in written:
        try:
            recorded = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise IntegrityError(f"{path}: unreadable iterator state ({e})") from None
        if isinstance(recorded, dict) and "next_index" in recorded and recorded["next_index"] != step:
            raise UserError(f"{path}: the data position ({recorded['next_index']}) is not the step ({step}): "
                            "it cannot be re-derived for another process count; resume with the process "
                            "count that wrote it")
    data_iter.set_state({"next_index": int(step)})


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
    import jax

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
