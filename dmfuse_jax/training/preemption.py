"""Preemption: SIGTERM / SIGINT (or, across hosts, JAX's preemption notice) stop a training run at
the next step boundary, after a checkpoint (`trainer.fit`; exit code 75, `errors.EXIT_PREEMPTED`)."""
from __future__ import annotations

import signal
import threading
from typing import Any


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

    def requested(self, step: int, checkpointer: Any = None) -> bool:
        if self.signal_name is not None:
            return True
        if self.multiprocess and checkpointer is not None and checkpointer.reached_preemption(step):
            self.signal_name = "preemption notice"
            return True
        return False
