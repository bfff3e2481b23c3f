"""The best checkpoint of a run: `config.checkpoint.best = dict(metric='eval/NAME/...', mode='max')`.

Kept beside the latest checkpoints, in its own orbax `CheckpointManager` at `WORKDIR/best/<step>/`
(`max_to_keep=1`, `best_fn` on the saved metric, `best_mode`), so the keep-last-N policy of
`checkpoints/` is untouched. Each time an eval gives a better value than the kept one, the weights
(params, EMA, frozen params; not the optimizer state) are saved there with the value as the step's
orbax metrics and host checksums (sum |x| per array) in 'meta'; orbax commits atomically and deletes
the worse step. On resume the kept step and its value are read back from orbax's metrics, so the best
tracks the argmax over the whole run; a step that is evaluated again after a resume (a run that stopped
between its best save and its next checkpoint: training is deterministic, so the same value) is not
saved twice.

Cost: one weights-only save per improvement (asynchronous, like the periodic ones), and the disk of
one more copy of the weights. Read back by `load_best_params` (`dmfuse fuse|export|convert-npz
--checkpoint WORKDIR --step best`).
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from dmfuse_jax.errors import UserError

log = logging.getLogger(__name__)

MODES = ("max", "min")


from dmfuse_jax.workdir import BEST_DIR, best_manager as _manager  # noqa: E402


class BestCheckpoint:
    """Keeps the weights of the best step by `metric` (an `eval/...` key) under `mode`."""

    def __init__(self, workdir: Path, metric: str, mode: str):
        self.directory = Path(workdir) / BEST_DIR
        self.metric, self.mode = metric, mode
        self.manager = _manager(self.directory, mode)
        self.step, self.value = None, None
        self.saves, self.save_seconds = 0, 0.0  # this run's saves and the time they blocked the loop
        best = self.manager.best_step()
        if best is not None:  # resume: the kept step and its value
            self.step, self.value = int(best), float(self.manager.metrics(best)["value"])

    @classmethod
    def from_config(cls, config, workdir: Path | None, produced: list[str]) -> "BestCheckpoint | None":
        best = config.get("checkpoint", {}).get("best", {}) if "checkpoint" in config else {}
        metric = str(best.get("metric", "") or "")
        if not metric or workdir is None:
            return None
        mode = str(best.get("mode", "max"))
        if mode not in MODES:
            raise UserError(f"config.checkpoint.best.mode is {mode!r}: expected 'max' or 'min'")
        if metric not in produced:
            raise UserError(f"config.checkpoint.best.metric is {metric!r}, which no evaluator of config.evals "
                            f"produces (they produce: {', '.join(produced) or 'nothing: no evals are on'})")
        return cls(workdir, metric, mode)

    def better(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.value is None:
            return True
        return value > self.value if self.mode == "max" else value < self.value

    def update(self, step: int, scalars: dict[str, float], state) -> bool:
        """Saves `state`'s weights if `scalars[metric]` beats the kept value (all processes agree:
        the scalars are the same everywhere). Returns whether it saved."""
        import orbax.checkpoint as ocp

        if self.metric not in scalars:
            return False
        value = float(scalars[self.metric])
        if not self.better(value) or step in self.manager.all_steps():
            return False
        import jax

        from dmfuse_jax.workdir import CHECKSUM, array_hashes, leaf_names

        t = time.perf_counter()
        weights, _ = state.split_items()
        # the same content hashes as the regular checkpoints (checkpoint.array_hashes), in the meta
        meta = {"step": int(step), "metric": self.metric, "mode": self.mode, "value": value,
                "checksum": CHECKSUM, "checksum_names": leaf_names(weights),
                "checksums": [int(h) for h in jax.device_get(array_hashes(weights))]}
        self.manager.save(step, force=True, metrics={"value": value}, args=ocp.args.Composite(
            weights=ocp.args.StandardSave(weights), meta=ocp.args.JsonSave(meta)))
        self.step, self.value = int(step), value
        self.saves += 1
        self.save_seconds += time.perf_counter() - t
        return True

    def close(self) -> None:
        t = time.perf_counter()
        self.manager.wait_until_finished()
        self.save_seconds += time.perf_counter() - t
        self.manager.close()
