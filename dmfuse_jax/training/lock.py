"""One writer per training workdir: an exclusive lock on `WORKDIR/train.lock`, held for the whole run.

The lock is a kernel lock (`fcntl.flock`) on that file, so it is released on every exit, even a
SIGKILL or a crash; the file's text names the holder (host, pid, start time, command) for the error a
second `dmfuse train` prints. A clean exit empties the file; a file that still names a holder when the
lock is free was left by a process that died: it is taken over with a `StaleLockWarning`.
On filesystems without flock (some cluster mounts) the holder text alone decides: a holder on this
host whose pid is gone is stale; one on another host is trusted (delete the file if that run is dead).
In multi-host runs process 0 takes the lock (`train.py`).
The file is never deleted (deleting a locked file would let a third run lock a new one).
"""
from __future__ import annotations

import datetime
import errno
import json
import os
import socket
import sys
import warnings
from pathlib import Path

from dmfuse_jax.errors import UserError

LOCK_FILE = "train.lock"


class StaleLockWarning(UserWarning):
    """The workdir's lock was left by a process that no longer runs; this run took it over."""


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)[:300]}


def describe(holder: dict) -> str:
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started "
            f"{holder.get('started', '?')}")


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True  # exists (another user's), or unreadable: assume alive
    return True


class WorkdirLock:
    """`with WorkdirLock(workdir):` or acquire()/release(). acquire raises UserError naming the holder
    when another process holds the lock."""

    def __init__(self, workdir: str | os.PathLike):
        self.path = Path(workdir) / LOCK_FILE
        self._fd: int | None = None
        self.took_over: dict | None = None

    def _read(self, fd: int) -> dict | None:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 65536).decode("utf-8", "replace").strip()
        if not text:
            return None
        try:
            got = json.loads(text)
        except ValueError:
            return {"host": "?", "pid": "?", "started": "?", "raw": text[:200]}
        return got if isinstance(got, dict) else {"raw": text[:200]}

    def acquire(self) -> "WorkdirLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            kernel_lock = True
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read(fd) or {}
                raise UserError(f"{self.path.parent}: another dmfuse train is writing this workdir "
                                f"({describe(holder)}; lock {self.path}); wait for it to finish or stop it, "
                                "or use another --workdir") from None
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                kernel_lock = False  # no flock on this filesystem: the holder text decides
            previous = self._read(fd)
            if previous is not None:
                same_host = previous.get("host") == socket.gethostname()
                if not kernel_lock and not (same_host and not _pid_alive(previous.get("pid"))):
                    raise UserError(f"{self.path.parent}: another dmfuse train is writing this workdir "
                                    f"({describe(previous)}; lock {self.path}, no kernel locks on this "
                                    "filesystem); if that run is dead, delete the lock file and run again")
                self.took_over = previous
                warnings.warn(f"{self.path}: taking over the lock left by {describe(previous)}, which is no "
                              "longer running", StaleLockWarning, stacklevel=2)
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(_holder()) + "\n").encode())
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Empties the file (a clean exit leaves no holder behind) and unlocks."""
        if self._fd is None:
            return
        try:
            os.ftruncate(self._fd, 0)
        except OSError:
            pass
        finally:
            os.close(self._fd)  # closing releases the flock
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False
