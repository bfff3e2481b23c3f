"""Start-up phases of a command: seconds from the process's own start (so Python's start-up and the
imports are counted), split where the command says. A command run inside a longer-lived process
(`cli.main` called from Python or a test) counts from its own entry instead (`enter()`). `dmfuse fuse` prints them in one line and, with
`--timings-json FILE`, writes them for `benchmarks/startup.py`.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path


def process_seconds() -> float:
    """Seconds since this process started (Linux /proc; elsewhere since this module was imported)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED


_IMPORTED = time.perf_counter()
# perf_counter() when the current command was entered (`enter`), or None: count from the process start
_ENTERED: list[float | None] = [None]
# a process that reaches its command later than this after starting is not a fresh `dmfuse` process
FRESH_PROCESS_S = 5.0


def enter() -> None:
    """Called by `cli.main`: in a fresh process, phases count from the process start; in one that has
    run for longer (a Python session, a test run), from now."""
    _ENTERED[0] = None if process_seconds() < FRESH_PROCESS_S else time.perf_counter()


class Phases:
    """`mark(name)` ends phase `name` now; `seconds` maps each phase to its length, in order."""

    def __init__(self):
        entered = _ENTERED[0]
        self._origin = entered if entered is not None else time.perf_counter() - process_seconds()
        self._last = self._origin
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, object] = {}

    def mark(self, name: str) -> float:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._last
        self._last = now
        return self.seconds[name]

    def total(self) -> float:
        return self._last - self._origin

    def line(self, names: list[str] | None = None) -> str:
        shown = [(k, v) for k, v in self.seconds.items() if names is None or k in names]
        return ", ".join(f"{k} {v:.2f}" for k, v in shown)

    def write_json(self, path: str | os.PathLike, **extra) -> None:
        """Atomically (temporary sibling + rename)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"seconds": self.seconds, "counts": self.counts, **extra}, indent=2) + "\n")
        os.replace(tmp, path)
