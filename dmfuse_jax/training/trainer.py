"""The training loop shared by both stages: mesh, sharded state, one jitted step, data, checkpoints,
logs (TensorBoard, metrics.jsonl, progress bar) and previews.

A stage (see `pretrain.PretrainStage`, `fusion.FusionStage`) provides the data source, the params
(trained and frozen), the loss and its previews; everything else lives here, once.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dmfuse_jax import compilation
from dmfuse_jax.data.pipeline import place_batch, train_dataset, train_iterator
from dmfuse_jax.errors import TrainingDiverged, UserError
from dmfuse_jax import sharding as shd
from dmfuse_jax.training.state import TrainState, apply_gradients, initial_state, make_optimizer

log = logging.getLogger(__name__)

def make_train_step(stage, tx: optax.GradientTransformation, ema_decay: float):
    """train_step(state, batch) -> (state, metrics): pure; jit it once with shardings.
    A batch with 'skipped' (B,) (unreadable files passed over per example) adds its global sum as
    metrics['skipped_files']: summed on the devices, so it counts every worker and process.
    A step whose loss or gradient norm is not finite is not applied: params, optimizer state and EMA
    stay as they were (the step counter and RNG advance), and metrics['nonfinite'] is 1; the host
    decides whether to stop (`fit`, config.max_nonfinite_steps). So no non-finite state exists."""

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng, key = jax.random.split(state.rng)

        def loss_fn(params):
            return stage.loss(params, state.frozen, batch, key)

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        new_state = apply_gradients(state, grads, tx, ema_decay, rng)
        kept = state.replace(step=new_state.step, rng=new_state.rng)
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, kept)
        metrics = {"loss": loss, "grad_norm": grad_norm, **aux, "nonfinite": (~finite).astype(jnp.int32)}
        if "skipped" in batch:
            metrics["skipped_files"] = batch["skipped"].sum()
        return new_state, metrics

    return train_step


class Trainer:
    """Everything one run needs except the data: built from (config, stage, mesh)."""

    def __init__(self, config, stage, mesh=None, total_steps: int | None = None):
        self.config, self.stage = config, stage
        self.mesh = mesh if mesh is not None else shd.make_mesh(tuple(config.sharding.mesh_shape))
        self.total_steps = int(total_steps if total_steps is not None else config.total_steps)
        shd.check_batch(int(config.batch_size), self.mesh)
        self.tx, self.lr_schedule = make_optimizer(config.optimizer, self.total_steps)
        self.replicated = shd.replicated(self.mesh)
        self.batch_sharding = shd.batch_sharding(self.mesh)

        def init_fn(key):
            k_params, k_rng = jax.random.split(key)
            params, frozen = stage.init_params(k_params)
            return initial_state(params, frozen, self.tx, k_rng)

        self._init_fn = init_fn
        key = jax.random.PRNGKey(int(config.seed))
        self.abstract_state = jax.eval_shape(init_fn, key)
        self.state_sharding = shd.state_shardings(self.abstract_state, self.mesh,
                                                  int(config.sharding.get("fsdp_min_size", 2 ** 18)))
        step_fn = make_train_step(stage, self.tx, float(config.optimizer.get("ema_decay", 0.0)))
        self._train_step = compilation.jit(step_fn, in_shardings=(self.state_sharding, self.batch_sharding),
                                           out_shardings=(self.state_sharding, self.replicated),
                                           donate_argnums=(0,))
        self.workdir: Path | None = None
        self._writer = None

    # The step is traced under the mesh (`jax.set_mesh`) so opaque kernels (the Pallas criss-cross
    # attention) run per batch shard instead of replicated (`criss_cross.batch_parallel`).
    def train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        with jax.set_mesh(self.mesh):
            return self._train_step(state, batch)

    def lower(self, platforms: tuple[str, ...] | None = None) -> Any:
        """The train step lowered for this state and batch layout (abstract: no data needed);
        `platforms` (e.g. ('cuda',)) lowers for a backend this machine does not have."""
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.batch_sharding)
                 for k, v in self.stage.example_batch(int(self.config.batch_size)).items()}
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                             self.abstract_state, self.state_sharding)
        with jax.set_mesh(self.mesh):
            if platforms:
                return self._train_step.trace(state, batch).lower(lowering_platforms=tuple(platforms))
            return self._train_step.lower(state, batch)

    def compile(self) -> Any:
        """The train step compiled ahead of time for this state and batch layout (once per run)."""
        return self.lower().compile()

    def init_state(self) -> TrainState:
        """Fresh state (params created directly with their shardings), then the stage's pretrained
        weights (stage 2: the UNet) put in place."""
        key = jax.random.PRNGKey(int(self.config.seed))
        state = compilation.jit(self._init_fn, out_shardings=self.state_sharding)(key)
        return self.stage.load_pretrained(state, self.state_sharding)

    def place(self, local_batch: dict) -> dict:
        return place_batch(local_batch, self.batch_sharding)

    # -- outputs (process 0 writes)
    @property
    def is_chief(self) -> bool:
        return jax.process_index() == 0

    def writer(self):
        if self._writer is None and self.is_chief and self.workdir is not None:
            from tensorboardX import SummaryWriter
            self._writer = SummaryWriter(str(self.workdir / "tensorboard"))
        return self._writer

    def write_image(self, relpath: str, tag: str, image01: np.ndarray, step: int) -> None:
        """(H, W, C) in [0, 1] -> workdir/relpath (PNG, atomic) and TensorBoard."""
        if not self.is_chief or self.workdir is None:
            return
        from dmfuse_jax.data.images import write_image_atomic
        write_image_atomic(self.workdir / relpath, image01)
        w = self.writer()
        if w is not None:
            img = image01 if image01.shape[-1] == 3 else np.repeat(image01, 3, axis=-1)
            w.add_image(tag, np.clip(img, 0, 1), step, dataformats="HWC")

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        if not self.is_chief or self.workdir is None:
            return
        w = self.writer()
        for k, v in scalars.items():
            w.add_scalar(k, v, step)
        w.flush()
        with open(self.workdir / METRICS_FILE, "a") as f:
            f.write(json.dumps({"step": step, **scalars}) + "\n")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def total_steps_of(config, num_examples: int) -> int:
    """config.total_steps, or (when <= 0) num_epochs epochs of the data at batch_size."""
    if int(config.total_steps) > 0:
        return int(config.total_steps)
    epochs = float(config.get("num_epochs", 0))
    if epochs <= 0:
        raise UserError("set total_steps (> 0) or num_epochs (> 0) in the config")
    return max(1, math.ceil(epochs * num_examples / int(config.batch_size)))


METRICS_FILE = "metrics.jsonl"


def trim_metrics(workdir: Path, step: int) -> int:
    """Keeps metrics.jsonl one line per logged step across resumes: drops the rows past `step` (the
    restored checkpoint; those steps run again) and torn lines, atomically. -> rows dropped."""
    from dmfuse_jax.data.images import write_text_atomic

    path = Path(workdir) / METRICS_FILE
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line)
    if len(kept) != len(lines):
        write_text_atomic(path, "".join(f"{line}\n" for line in kept))
    return len(lines) - len(kept)


class FiniteGuard:
    """The host side of the divergence guard: reads the per-step 'nonfinite' flags (at log and save
    points only: no extra host sync in the loop) and stops the run (TrainingDiverged, exit 3) once
    more than `max_skipped` steps were not finite; until then each one is reported and skipped."""

    def __init__(self, max_skipped: int, chief: bool):
        self.max_skipped, self.chief = int(max_skipped), chief
        self.unchecked: list[tuple[int, dict]] = []
        self.skipped: list[int] = []

    def add(self, step: int, metrics: dict) -> None:
        self.unchecked.append((step, metrics))

    def check(self, last_checkpoint) -> None:
        if not self.unchecked:
            return
        got = jax.device_get([(m["nonfinite"], m["loss"], m["grad_norm"]) for _, m in self.unchecked])
        steps = [s for s, _ in self.unchecked]
        self.unchecked = []
        for step, (bad, loss, gnorm) in zip(steps, got):
            if not int(bad):
                continue
            self.skipped.append(step)
            what = f"step {step}: non-finite loss ({float(loss)}) or gradient norm ({float(gnorm)})"
            if len(self.skipped) > self.max_skipped:
                last = f"step {last_checkpoint}" if last_checkpoint is not None else "none yet"
                raise TrainingDiverged(
                    f"{what}; the run stopped and saved nothing of it (last checkpoint: {last}, finite). "
                    "Lower optimizer.learning_rate (or raise optimizer.warmup_steps / set optimizer.grad_clip), "
                    f"or allow skipping such steps with --config.max_nonfinite_steps=N"
                    + (f" (skipped so far: {len(self.skipped) - 1})" if self.max_skipped else ""))
            if self.chief:
                print(f"{what}: update skipped ({len(self.skipped)} of max_nonfinite_steps="
                      f"{self.max_skipped})", flush=True)


def fit(config, workdir: str | os.PathLike, stage, on_step: Callable | None = None) -> dict:
    """Trains `stage` in `workdir` (resuming from its latest valid checkpoint). Returns a summary.
    Raises TrainingDiverged (a non-finite step beyond config.max_nonfinite_steps; nothing of it is
    saved) and SaveFailed (disk full, quota, permission while saving).

    on_step(step, checkpointer, watch) -> bool: called after each step and its checkpoint save; True
    stops the run as a preemption does (final save, summary['preempted'] = the signal watched for).
    The tests inject faults with it (tests/hang_train.py: wait at a step for a signal)."""
    from tqdm import tqdm

    from dmfuse_jax.startup import Phases
    from dmfuse_jax.training.checkpoint import Checkpointer
    from dmfuse_jax.training.preemption import PreemptionWatch

    phases = Phases()  # the start-up line printed after the first step (benchmarks/startup.py reads it)
    phases.mark("imports")  # and the config, up to here
    workdir = Path(workdir)
    chief = jax.process_index() == 0
    source, transform = stage.train_source(workdir)
    if chief:
        print(f"data: {source.summary() if hasattr(source, 'summary') else repr(source)}", flush=True)
    total = total_steps_of(config, len(source))
    trainer = Trainer(config, stage, total_steps=total)
    trainer.workdir = workdir
    if chief:
        print(f"mesh: {dict(trainer.mesh.shape)} over {jax.device_count()} devices, "
              f"{jax.process_count()} process(es); global batch {config.batch_size}; {total} steps", flush=True)

    ds = train_dataset(source, transform, seed=int(config.seed), global_batch=int(config.batch_size),
                       process_index=jax.process_index(), process_count=jax.process_count())
    d = config.data
    data_iter = train_iterator(ds, num_threads=int(d.get("num_threads", 2)), prefetch=int(d.get("prefetch", 8)),
                               worker_count=int(d.get("worker_count", 0)))

    ckpt = Checkpointer(workdir, every=int(config.checkpoint_every_steps),
                        keep=int(config.get("keep_checkpoints", 3)) or None, stage=stage.name, config=config)
    # Evals (issue 22): built, their data read and checked, before any restore or step.
    from dmfuse_jax.training.evals import EvalRunner
    evals = EvalRunner(config, stage, trainer, total, workdir)
    phases.mark("setup")
    restored = ckpt.restore_latest(trainer.abstract_state, trainer.state_sharding, data_iter)
    if restored is None:
        state, start = trainer.init_state(), 0
    else:
        state, start = restored
        if chief:
            print(f"resumed from {ckpt.directory / str(start)}", flush=True)
    if chief:
        trim_metrics(workdir, start)

    phases.mark("restore")
    t0 = time.perf_counter()
    train_step = trainer.compile()
    phases.mark("compile")
    if chief:
        print(f"train step compiled in {time.perf_counter() - t0:.1f} s", flush=True)
    evals.start(start)

    log_every = max(1, int(config.get("log_every_steps", 50)))
    preview_every = int(config.get("preview_every_steps", 0))
    guard = FiniteGuard(int(config.get("max_nonfinite_steps", 0)), chief)
    pending: list[dict] = []
    skipped_files = 0  # unreadable files passed over in the batches of this run (since its start)
    summary = {"start_step": start, "end_step": start, "preempted": None}
    t_last, step_last = time.perf_counter(), start
    bar = tqdm(total=total, initial=start, disable=not chief, dynamic_ncols=True, desc=stage.name,
               file=sys.stdout, mininterval=2.0)
    step = start
    with PreemptionWatch(multiprocess=jax.process_count() > 1) as watch:
        try:
            while step < total:
                batch = trainer.place(next(data_iter))
                state, metrics = train_step(state, batch)
                step += 1
                if step == start + 1 and chief:  # one host sync, once: when the first step is done
                    jax.block_until_ready(metrics)
                    phases.mark("first step")
                    tqdm.write(f"start-up {phases.total():.2f} s to the first step: {phases.line()} s", file=sys.stdout)
                pending.append(metrics)
                guard.add(step, metrics)
                bar.update(1)
                if step % log_every == 0 or step == total:
                    guard.check(ckpt.latest_step())
                    # The only host sync of the loop: metrics of the last `log_every` steps.
                    got = jax.device_get(pending)
                    pending = []
                    skipped = [int(m.pop("skipped_files")) for m in got if "skipped_files" in m]
                    skipped_files += sum(skipped)
                    now = time.perf_counter()
                    scalars = {f"train/{k}": float(np.mean([m[k] for m in got])) for k in got[0]}
                    scalars["train/learning_rate"] = float(trainer.lr_schedule(step - 1))
                    scalars["perf/images_per_second"] = (step - step_last) * int(config.batch_size) / (now - t_last)
                    if skipped:
                        scalars["data/skipped_files"] = float(skipped_files)
                    t_last, step_last = now, step
                    trainer.log_scalars(step, scalars)
                    bar.set_postfix(loss=f"{scalars['train/loss']:.4f}", refresh=False)
                if preview_every > 0 and (step % preview_every == 0 or step == total):
                    stage.preview(trainer, state, step)
                evals.after_step(state, step)  # issue 22: due evals, their logs, the best checkpoint
                stop = watch.requested(step, ckpt)
                if ckpt.due(step) or stop or step == total:
                    guard.check(ckpt.latest_step())  # never save a step the guard has not passed
                ckpt.save(step, state, data_iter)
                if on_step is not None and on_step(step, ckpt, watch):
                    stop = True
                if stop:
                    summary["preempted"] = watch.signal_name
                    break
            guard.check(ckpt.latest_step())
            ckpt.save(step, state, data_iter, force=True)
            ckpt.close()
        except BaseException:
            ckpt.abandon()  # let committed saves finish; start no new one
            raise
        finally:
            bar.close()
            trainer.close()
    summary["evals"] = evals.close()  # issue 22: waits for a best save; prints the evals' share
    summary["end_step"] = step
    summary["nonfinite_steps"] = guard.skipped
    if chief:
        if summary["preempted"]:
            print(f"stopped by {summary['preempted']} at step {step}; checkpoint saved in {ckpt.directory}; "
                  "run the same command again to resume", flush=True)
        else:
            print(f"done: {step} steps; checkpoints in {ckpt.directory}", flush=True)
    summary["state"] = state
    return summary
