"""The orbax Checkpointer of a training run: saving and restoring the whole train state. The workdir's
layout, its config.json, the checksums and the params readers are `dmfuse_jax/workdir.py`;
preemption is `preemption.py`.

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
import json
import logging
import os
import re
import time
import warnings
from pathlib import Path


from dmfuse_jax.errors import SaveFailed, UserError
from dmfuse_jax.training.preemption import _sync
from dmfuse_jax.workdir import (CHECKPOINT_DIR, CHECKSUM, CorruptCheckpointWarning, IntegrityError, _quiet,
                                _restore_host_item, array_hashes, check_checksum_kind, check_config, compare_hashes,
                                config_record, is_damage, leaf_names, reader_manager,
                                settle_reads_before_closing_loops)

log = logging.getLogger(__name__)

CORRUPT_DIR = "corrupt_checkpoints"
ITEMS = ("weights", "train", "data", "meta", "integrity")


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


def _manager(directory: Path, *, every: int = 1, keep: int | None = None, read_only: bool = False,
             async_save: bool = True):
    import orbax.checkpoint as ocp

    settle_reads_before_closing_loops()

    if read_only:
        return reader_manager(directory)
    import grain
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=max(1, int(every)), max_to_keep=keep,
        create=True, enable_async_checkpointing=async_save)
    # Handlers fixed per item (not inferred from the first call, which may be a restore).
    handlers = {"weights": ocp.StandardCheckpointHandler(), "train": ocp.StandardCheckpointHandler(),
                "integrity": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler()}
    return ocp.CheckpointManager(directory.resolve(), options=options, item_handlers=handlers)


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


