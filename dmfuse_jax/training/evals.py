"""Evaluation while training, the big_vision way: `config.evals` is a dict of named evaluators, each
run every `every_steps` steps (and at the last step), logged beside the training metrics.

    config.evals.holdout = dict(type="fusion_metrics", every_steps=500, pairs="holdout",
                                metrics=("Qabf", "VIF", "SSIM", "MS_SSIM_MEF"))

Evaluator types (`EVALUATORS`, a registry: a new type is a new row):
  fusion_metrics  stage 2: fuses held-out pairs with the current params (EMA and raw) through the
                  fuse function of `dmfuse fuse` (`inference.fuser.fuse_function`) on its shape buckets
                  (`buckets.plan_batches`, same multiple and bucket limit), each bucket compiled once
                  for the run; scores them with `evaluation.metrics` (vifb convention by default) and
                  writes a preview grid of the first pairs ([infrared | visible | fused]).
  diffusion_loss  stage 1: the DDPM epsilon loss of held-out images at fixed timesteps (one per bin)
                  with a fixed noise key per bin, so the curve moves only when the params do.
  sample_grid     stage 1: reverse-diffusion samples from a fixed key (what `preview_every_steps`
                  writes), as `samples/step_XXXXXXXX.png`.

Every value goes to TensorBoard and `metrics.jsonl` as `eval/NAME/...` (with the step) and to
`evals/NAME.csv`. Evaluators are built (their data read and checked) before step 1, so a bad folder
is a `UserError` (exit 2) before any training. They read the train state and never write it, use
their own fixed keys and no donation: training is bit-identical with and without them. In a
multi-process run every process computes (the fuse and the loss run on every device of the mesh; the
metrics of pair i on process i % process_count, gathered), process 0 writes.
"""
from __future__ import annotations

import csv
import io
import logging
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dmfuse_jax import compilation
from dmfuse_jax.errors import UserError

log = logging.getLogger(__name__)

EVAL_DIR = "evals"
PARAM_VARIANTS = ("ema", "raw")


# ------------------------------------------------------------------------------------- helpers


def _opt(cfg, key: str, default):
    v = cfg.get(key, default) if hasattr(cfg, "get") else default
    return default if v is None else v


def _variants(cfg, config, name: str) -> tuple[str, ...]:
    """The params an evaluator scores: 'ema' and/or 'raw'; 'ema' is dropped when the run keeps no
    EMA (optimizer.ema_decay 0: it equals the raw params)."""
    want = tuple(_opt(cfg, "params", PARAM_VARIANTS))
    bad = [v for v in want if v not in PARAM_VARIANTS]
    if bad or not want:
        raise UserError(f"config.evals.{name}.params is {want!r}: expected a subset of {PARAM_VARIANTS}")
    if float(config.optimizer.get("ema_decay", 0.0)) <= 0.0:
        want = tuple(v for v in want if v != "ema") or ("raw",)
    return want


def _params_of(state, variant: str):
    return state.ema_params if variant == "ema" else state.params


def _global(host: np.ndarray, sharding) -> jax.Array:
    """A host array (the same on every process) -> a global array with `sharding`."""
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def _to_host(x: jax.Array) -> np.ndarray:
    """A replicated global array -> numpy on every process (multi-process safe)."""
    return np.asarray(x.addressable_data(0))


def _batch_divisor(trainer) -> int:
    """Batch sizes must split evenly over the mesh axes the batch is sharded on."""
    sh = trainer.batch_sharding
    return int(np.prod([sh.mesh.shape[a] for a in jax.tree.leaves(sh.spec[0])])) if sh.spec and sh.spec[0] else 1


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _gather_rows(local: np.ndarray) -> np.ndarray:
    """(N, M) per process, row i filled by process i % P -> the filled rows, (N, M), on every process."""
    nproc = jax.process_count()
    if nproc == 1:
        return local
    from jax.experimental import multihost_utils
    every = np.asarray(multihost_utils.process_allgather(local))  # (P, N, M)
    return np.stack([every[i % nproc, i] for i in range(local.shape[0])])


def _folder(cfg, key: str, where: str) -> Path:
    """An existing folder named by option `key`, or a UserError naming the option."""
    from dmfuse_jax.data.pipeline import resolve_path

    given = str(_opt(cfg, key, "") or "")
    if not given:
        raise UserError(f"{where}.{key} is empty: give the folder of the evaluation images")
    path = resolve_path(given, f"{where}.{key}")
    if not path.is_dir():
        raise UserError(f"{path}: no such folder ({where}.{key})")
    return path


def crop_center(img: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    sh, sw = min(size, h), min(size, w)
    y, x = (h - sh) // 2, (w - sw) // 2
    return img[y:y + sh, x:x + sw]


# ------------------------------------------------------------------------------ fusion_metrics


class FusionMetrics:
    """Stage 2. Options: pairs ('holdout': the pairs `config.data` holds out, or 'folder'), ir_dir,
    vi_dir, max_pairs (folder: the first N names; 0 all), metrics (names of `evaluation.metrics`),
    convention ('vifb'), params (('ema', 'raw')), batch_size (4, as `dmfuse fuse`), seed (0, as
    `dmfuse fuse`), preview_pairs (pairs in the grid; 0 none), preview_size (crop side)."""

    kind = "fusion_metrics"
    options = ("pairs", "ir_dir", "vi_dir", "max_pairs", "metrics", "convention", "params", "batch_size", "seed",
               "preview_pairs", "preview_size")

    def __init__(self, name: str, cfg, config, stage, trainer):
        from dmfuse_jax.data.fusion_pairs import check_sizes, split_pairs
        from dmfuse_jax.data.images import luma, match_pairs, read_image
        from dmfuse_jax.data.pipeline import resolve_path
        from dmfuse_jax.evaluation.metrics import evaluate_images, get_convention
        from dmfuse_jax.inference import buckets
        from dmfuse_jax.inference.fuser import fuse_function

        if stage.name != "fusion":
            raise UserError(f"config.evals.{name}: fusion_metrics needs a fusion-stage config (this is {stage.name!r})")
        self.name, self.trainer = name, trainer
        where = f"config.evals.{name}"
        source = str(_opt(cfg, "pairs", "holdout"))
        if source == "holdout":
            d = config.data
            _, pairs = split_pairs(resolve_path(d.ir_dir, "data.ir_dir"), resolve_path(d.vi_dir, "data.vi_dir"),
                                   int(d.get("num_holdout", 0)), int(d.get("max_pairs", 0)))
            if not pairs:
                raise UserError(f"{where}: pairs='holdout' but config.data.num_holdout is 0 (no held-out pairs)")
        elif source == "folder":
            ir, vi = (_folder(cfg, key, where) for key in ("ir_dir", "vi_dir"))
            pairs = match_pairs(ir, vi)
            n = int(_opt(cfg, "max_pairs", 0))
            pairs = pairs[:n] if n > 0 else pairs
            if not pairs:
                raise UserError(f"{where}: no matching pairs in {ir} and {vi}")
        else:
            raise UserError(f"{where}.pairs is {source!r}: expected 'holdout' or 'folder'")
        check_sizes(pairs)
        try:
            conv = get_convention(str(_opt(cfg, "convention", "vifb")))
        except ValueError as e:
            raise UserError(f"{where}.convention: {e}") from None
        self.convention = str(_opt(cfg, "convention", "vifb"))
        self.metrics = list(_opt(cfg, "metrics", ("Qabf", "VIF", "SSIM", "MS_SSIM_MEF")))
        unknown = [m for m in self.metrics if m not in conv.metrics]
        if unknown or not self.metrics:
            raise UserError(f"{where}.metrics: unknown {unknown or 'empty'} (known: {', '.join(conv.metrics)})")
        self.variants = _variants(cfg, config, name)
        self.names = [n for n, _, _ in pairs]
        # Read once, at startup: a bad file fails here, before step 1 (read_image names the file).
        self.ir = [luma(read_image(a))[..., :1].astype(np.float32) for _, a, _ in pairs]
        self.vi = [luma(read_image(b))[..., :1].astype(np.float32) for _, _, b in pairs]
        # The metrics once on the smallest pair (its visible image as the "fused" one): a pair too small
        # for a metric (MS_SSIM_MEF needs 44 pixels a side) fails here, not after hours of training.
        i = min(range(len(pairs)), key=lambda j: self.ir[j].shape[0] * self.ir[j].shape[1])
        try:
            evaluate_images(self.ir[i], self.vi[i], self.vi[i], names=self.metrics, convention=self.convention)
        except ValueError as e:
            raise UserError(f"{pairs[i][1]}: {where}.metrics cannot score this pair: {e}") from None
        self.seed = int(_opt(cfg, "seed", 0))
        self.preview_pairs = int(_opt(cfg, "preview_pairs", 2))
        self.preview_size = int(_opt(cfg, "preview_size", 256))
        stride = stage.model.unet.total_stride
        multiple = buckets.check_multiple(buckets.DEFAULT_MULTIPLE, stride)
        div = _batch_divisor(trainer)
        plan = buckets.plan_batches([x.shape[:2] for x in self.ir], multiple, int(_opt(cfg, "batch_size", 4)),
                                    buckets.DEFAULT_MAX_BUCKETS)
        # A batch is padded up to the mesh's batch split (repeating its last pair, as `Fuser.dispatch`).
        self.plan = [((_round_up(b, div), hb, wb), idx) for (b, hb, wb), idx in plan]
        fuse = fuse_function(stage.model, config.model.input_range)
        sh = trainer.state_sharding
        param_sh = {**sh.frozen, **sh.params}
        self._jit = compilation.jit(fuse, in_shardings=(param_sh, trainer.batch_sharding, trainer.batch_sharding,
                                                        trainer.replicated), out_shardings=trainer.replicated)
        self._exe: dict[tuple, Any] = {}
        self.compile_s = 0.0

    def keys(self) -> list[str]:
        return [f"{v}/{m}" for v in self.variants for m in self.metrics]

    def _executable(self, shape, params):
        exe = self._exe.get(shape)
        if exe is None:
            t = time.perf_counter()
            b, hb, wb = shape
            img = jax.ShapeDtypeStruct((b, hb, wb, 1), jnp.float32, sharding=self.trainer.batch_sharding)
            with jax.set_mesh(self.trainer.mesh):
                exe = self._jit.lower(params, img, img, jax.ShapeDtypeStruct((), jnp.int32)).compile()
            self._exe[shape] = exe
            self.compile_s += time.perf_counter() - t
        return exe

    def fuse(self, params) -> list[np.ndarray]:
        """Every pair fused with `params` ({'unet', 'head'} global arrays): [(H_i, W_i, 1)] in [0, 1]."""
        from dmfuse_jax.inference.buckets import pad_to

        out: list = [None] * len(self.ir)
        tr = self.trainer
        for (b, hb, wb), idx in self.plan:
            ir = np.stack([pad_to(self.ir[i], (hb, wb)) for i in idx])
            vi = np.stack([pad_to(self.vi[i], (hb, wb)) for i in idx])
            if b > len(idx):
                ir = np.concatenate([ir, np.repeat(ir[-1:], b - len(idx), 0)])
                vi = np.concatenate([vi, np.repeat(vi[-1:], b - len(idx), 0)])
            exe = self._executable((b, hb, wb), params)
            with jax.set_mesh(tr.mesh):
                y = exe(params, _global(ir, tr.batch_sharding), _global(vi, tr.batch_sharding),
                        _global(np.int32(self.seed), tr.replicated))
            y = _to_host(y)
            for j, i in enumerate(idx):
                h, w = self.ir[i].shape[:2]
                out[i] = y[j, :h, :w]
        return out

    def run(self, state, step: int) -> dict[str, float]:
        from dmfuse_jax.evaluation.metrics import evaluate_images

        scalars, first = {}, None
        pid, nproc = jax.process_index(), jax.process_count()
        for v in self.variants:
            p = _params_of(state, v)
            fused = self.fuse({**state.frozen, **p})
            first = fused if first is None else first
            rows = np.full((len(fused), len(self.metrics)), np.nan)
            for i, f in enumerate(fused):
                if i % nproc == pid:
                    s = evaluate_images(self.ir[i], self.vi[i], f, names=self.metrics, convention=self.convention)
                    rows[i] = [s[m] for m in self.metrics]
            rows = _gather_rows(rows)
            for j, m in enumerate(self.metrics):
                scalars[f"{v}/{m}"] = float(np.mean(rows[:, j]))
        if self.preview_pairs > 0 and first is not None:
            n = min(self.preview_pairs, len(first))
            s = min([self.preview_size] + [min(x.shape[:2]) for x in self.ir[:n]])
            grid = np.concatenate([np.concatenate([crop_center(x[i], s) for x in (self.ir, self.vi, first)], axis=1)
                                   for i in range(n)], axis=0)
            self.trainer.write_image(f"{EVAL_DIR}/{self.name}/step_{step:08d}.png", f"eval/{self.name}/preview",
                                     np.clip(grid, 0, 1), step)
        return scalars


# ------------------------------------------------------------------------------ diffusion_loss


def load_eval_images(root, max_images: int, size: int, color: str, channels: int, where: str) -> np.ndarray:
    """`max_images` images of `root` (searched recursively), evenly spaced over the sorted list (all
    when 0): shorter side resized to `size`, centre crop, (N, size, size, channels) float32 in [-1, 1]."""
    from dmfuse_jax.data.images import read_image, to_model_range
    from dmfuse_jax.data.pipeline import resolve_path
    from dmfuse_jax.data.pretrain import resize_image, scan_image_tree, to_channels

    path = _folder({"root": root}, "root", where)
    files = scan_image_tree(path)
    if 0 < max_images < len(files):
        files = [files[i] for i in np.unique(np.linspace(0, len(files) - 1, max_images).round().astype(int))]
    out = []
    for f in files:
        img = read_image(path / f)
        if img.ndim == 2:
            img = img[..., None]
        h, w = img.shape[:2]
        if min(h, w) != size:
            scale = size / min(h, w)
            img = resize_image(img, max(size, round(h * scale)), max(size, round(w * scale)))
        img = crop_center(img, size)
        out.append(to_model_range(to_channels(np.clip(img, 0, 1), color, channels), "-1_1"))
    return np.stack(out).astype(np.float32)


def default_timesteps(num_timesteps: int, bins: int = 5) -> tuple[int, ...]:
    """The centre timestep (1-based) of each of `bins` equal bins of [1, T]."""
    return tuple(int(round((b + 0.5) * num_timesteps / bins)) for b in range(bins))


class DiffusionLoss:
    """Stage 1. Options: root (image folder, searched recursively), max_images (N evenly spaced; 0 all),
    timesteps (1-based; empty: the centres of 5 equal bins), params (('ema', 'raw')), seed.
    Per timestep t: the noise level is the middle of t's interval [sqrt_acp_prev[t], sqrt_acp_prev[t-1]]
    and the noise eps comes from fold_in(PRNGKey(seed), t): both fixed for the run."""

    kind = "diffusion_loss"
    options = ("root", "max_images", "timesteps", "params", "seed")

    def __init__(self, name: str, cfg, config, stage, trainer):
        if stage.name != "pretrain":
            raise UserError(f"config.evals.{name}: diffusion_loss needs a pretrain-stage config (this is {stage.name!r})")
        where = f"config.evals.{name}"
        self.name, self.trainer, self.stage = name, trainer, stage
        self.variants = _variants(cfg, config, name)
        T = stage.schedule.num_timesteps
        ts = tuple(int(t) for t in _opt(cfg, "timesteps", ())) or default_timesteps(T)
        if any(t < 1 or t > T for t in ts):
            raise UserError(f"{where}.timesteps {ts}: each must be in 1..{T} (diffusion.num_timesteps)")
        self.timesteps = ts
        x = load_eval_images(_opt(cfg, "root", ""), int(_opt(cfg, "max_images", 16)), stage.size,
                             config.data.get("color", "grey"), stage.unet.in_channels, where)
        self.n = len(x)
        b = _round_up(self.n, _batch_divisor(trainer))
        w = np.zeros((b,), np.float32)
        w[:self.n] = 1.0  # padding rows (repeats) carry no weight
        x = np.concatenate([x, np.repeat(x[-1:], b - self.n, 0)]) if b > self.n else x
        table = np.asarray(stage.schedule.sqrt_alphas_cumprod_prev, np.float64)
        # Fixed per timestep, as replicated global arrays (every process passes the same values).
        rep = trainer.replicated
        self._g = {t: _global(np.float32(0.5 * (table[t] + table[t - 1])), rep) for t in ts}
        seed = int(_opt(cfg, "seed", 0))
        self._keys = {t: _global(np.asarray(jax.random.fold_in(jax.random.PRNGKey(seed), t)), rep) for t in ts}
        self._x = _global(x, trainer.batch_sharding)
        self._w = _global(w, trainer.batch_sharding)
        loss_type = config.diffusion.get("loss_type", "l2")
        unet = stage.unet

        def loss_at(params, x0, weight, g, key):
            eps = jax.random.normal(key, x0.shape, jnp.float32)
            gb = jnp.full((x0.shape[0],), g)
            x_t = g * x0 + jnp.sqrt(1.0 - g * g) * eps
            eps_hat = unet.apply({"params": params}, x_t, gb).astype(jnp.float32)
            d = eps_hat - eps
            per = jnp.mean(d * d if loss_type == "l2" else jnp.abs(d), axis=(1, 2, 3))
            return jnp.sum(per * weight) / jnp.sum(weight)

        self._fn = compilation.jit(loss_at, out_shardings=trainer.replicated)
        self._exe = None
        self.compile_s = 0.0

    def keys(self) -> list[str]:
        return [f"{v}/{k}" for v in self.variants for k in ["loss"] + [f"loss_t{t:04d}" for t in self.timesteps]]

    def run(self, state, step: int) -> dict[str, float]:
        out = {}
        with jax.set_mesh(self.trainer.mesh):
            if self._exe is None:  # compiled once, ahead of time (EMA and raw params share the layout)
                t, t0 = self.timesteps[0], time.perf_counter()
                self._exe = self._fn.lower(state.params, self._x, self._w, self._g[t], self._keys[t]).compile()
                self.compile_s += time.perf_counter() - t0
            for v in self.variants:
                p = _params_of(state, v)
                vals = [self._exe(p, self._x, self._w, self._g[t], self._keys[t]) for t in self.timesteps]
                vals = [float(_to_host(a)) for a in vals]
                out[f"{v}/loss"] = float(np.mean(vals))
                out.update({f"{v}/loss_t{t:04d}": x for t, x in zip(self.timesteps, vals)})
        return out


# --------------------------------------------------------------------------------- sample_grid


class SampleGrid:
    """Stage 1. Options: num_samples (8), sample_steps (respaced chain, 50), params ('ema' or 'raw';
    'ema' falls back to 'raw' without EMA), seed (fixed: the same noise every time), cols (8).
    Writes samples/step_XXXXXXXX.png and TensorBoard 'samples' (no scalars)."""

    kind = "sample_grid"
    options = ("num_samples", "sample_steps", "params", "seed", "cols")

    def __init__(self, name: str, cfg, config, stage, trainer):
        from dmfuse_jax.diffusion.gaussian import p_sample_loop

        if stage.name != "pretrain":
            raise UserError(f"config.evals.{name}: sample_grid needs a pretrain-stage config (this is {stage.name!r})")
        self.name, self.trainer = name, trainer
        self.n = int(_opt(cfg, "num_samples", 8))
        if self.n < 1:
            raise UserError(f"config.evals.{name}.num_samples must be >= 1")
        self.cols = int(_opt(cfg, "cols", 8))
        v = str(_opt(cfg, "params", "ema"))
        self.variant = _variants({"params": (v,)}, config, name)[0]
        self.key = _global(np.asarray(jax.random.PRNGKey(int(_opt(cfg, "seed", int(config.seed) + 7)))),
                           trainer.replicated)
        shape = (self.n, stage.size, stage.size, stage.unet.in_channels)
        steps = int(_opt(cfg, "sample_steps", 50))
        unet, schedule = stage.unet, stage.schedule

        def sample(params, key):
            return p_sample_loop(lambda x, g: unet.apply({"params": params}, x, g), key, shape, schedule,
                                 num_steps=steps)
        self._fn = compilation.jit(sample, out_shardings=trainer.replicated)
        self._exe = None
        self.compile_s = 0.0

    def keys(self) -> list[str]:
        return []

    def run(self, state, step: int) -> dict[str, float]:
        from dmfuse_jax.data.images import from_model_range
        from dmfuse_jax.data.images import image_grid

        with jax.set_mesh(self.trainer.mesh):
            p = _params_of(state, self.variant)
            if self._exe is None:
                t0 = time.perf_counter()
                self._exe = self._fn.lower(p, self.key).compile()
                self.compile_s += time.perf_counter() - t0
            x = _to_host(self._exe(p, self.key))
        grid = image_grid(from_model_range(x, "-1_1"), cols=min(self.n, self.cols))
        self.trainer.write_image(f"samples/step_{step:08d}.png", "samples", grid, step)
        return {}


# type -> class. Registry: a new evaluator type is a new row.
EVALUATORS: dict[str, type] = {
    "fusion_metrics": FusionMetrics,
    "diffusion_loss": DiffusionLoss,
    "sample_grid": SampleGrid,
}


# -------------------------------------------------------------------------------------- runner


class EvalRunner:
    """The training loop's one eval hook: `start(step)` after restore, `after_step(state, step)` after
    each step, `close()` at the end (prints the evals' share of the run). Also keeps the best
    checkpoint (`config.checkpoint.best`, see `best.py`)."""

    def __init__(self, config, stage, trainer, total_steps: int, workdir: Path | None):
        self.total = int(total_steps)
        self.trainer, self.workdir = trainer, (Path(workdir) if workdir is not None else None)
        self.evaluators: list[tuple[Any, int]] = []
        self.seconds = 0.0
        self.runs = 0
        evals = config.get("evals") or {}
        for name in sorted(evals):
            cfg = evals[name]
            kind = cfg.get("type") if hasattr(cfg, "get") else None
            if kind not in EVALUATORS:
                raise UserError(f"config.evals.{name}.type is {kind!r}: expected one of {sorted(EVALUATORS)}")
            unknown = sorted(set(cfg.keys()) - {"type", "every_steps"} - set(EVALUATORS[kind].options))
            if unknown:
                raise UserError(f"config.evals.{name}: unknown option(s) {', '.join(unknown)} for a {kind} eval "
                                f"(its options: every_steps, {', '.join(EVALUATORS[kind].options)})")
            every = int(cfg.get("every_steps", 0))
            if every < 0:
                raise UserError(f"config.evals.{name}.every_steps must be >= 0 (0: off)")
            if every == 0:
                continue
            if "/" in name:
                raise UserError(f"config.evals: the name {name!r} must not contain '/'")
            self.evaluators.append((EVALUATORS[kind](name, cfg, config, stage, trainer), every))
        from dmfuse_jax.training.best import BestCheckpoint
        self.best = BestCheckpoint.from_config(config, self.workdir, self.produced()) if self.workdir else None
        self._t0 = time.perf_counter()

    def produced(self) -> list[str]:
        return [f"eval/{ev.name}/{k}" for ev, _ in self.evaluators for k in ev.keys()]

    def start(self, step: int) -> None:
        """After restore: CSV rows past `step` (a run that stopped before its next checkpoint) are dropped."""
        self._t0 = time.perf_counter()
        if self.workdir is None or not self.trainer.is_chief:
            return
        from dmfuse_jax.data.images import write_text_atomic
        for ev, _ in self.evaluators:
            path = self.workdir / EVAL_DIR / f"{ev.name}.csv"
            if path.is_file():
                rows = list(csv.DictReader(io.StringIO(path.read_text())))
                kept = [r for r in rows if int(r["step"]) <= step]
                if len(kept) != len(rows):
                    write_text_atomic(path, _csv_text(kept, list(rows[0])))

    def due(self, step: int) -> list:
        return [ev for ev, every in self.evaluators if step % every == 0 or step == self.total]

    def after_step(self, state, step: int) -> dict[str, float]:
        todo = self.due(step)
        if not todo:
            return {}
        t = time.perf_counter()
        scalars = {}
        for ev in todo:
            got = {f"eval/{ev.name}/{k}": v for k, v in ev.run(state, step).items()}
            if got:
                self._write_csv(ev, step, got)
            scalars.update(got)
        if scalars:
            self.trainer.log_scalars(step, scalars)
        if self.best is not None:
            self.best.update(step, scalars, state)
        self.seconds += time.perf_counter() - t
        self.runs += 1
        return scalars

    def _write_csv(self, ev, step: int, scalars: dict[str, float]) -> None:
        if self.workdir is None or not self.trainer.is_chief:
            return
        path = self.workdir / EVAL_DIR / f"{ev.name}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        cols = ["step"] + [k.split("/", 2)[2] for k in scalars]
        new = not path.is_file()
        with open(path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(cols)
            w.writerow([step] + [f"{v:.6g}" for v in scalars.values()])

    def summary(self) -> dict:
        wall = time.perf_counter() - self._t0
        compile_s = sum(getattr(ev, "compile_s", 0.0) for ev, _ in self.evaluators)
        return {"eval_seconds": self.seconds, "run_seconds": wall, "eval_share": self.seconds / max(wall, 1e-9),
                "eval_compile_seconds": compile_s, "eval_runs": self.runs}

    def close(self) -> dict:
        s = self.summary()
        if self.best is not None:
            self.best.close()
        if self.evaluators and self.trainer.is_chief:
            print(f"evals: {s['eval_runs']} run(s), {s['eval_seconds']:.1f} s of {s['run_seconds']:.1f} s of "
                  f"training ({100 * s['eval_share']:.1f}%; {s['eval_compile_seconds']:.1f} s compiling)", flush=True)
            if self.best is not None and self.best.step is not None:
                print(f"best checkpoint: step {self.best.step} ({self.best.metric} = {self.best.value:.6g}) in "
                      f"{self.best.directory}; {self.best.saves} save(s) this run, {self.best.save_seconds:.2f} s "
                      "blocking", flush=True)
        return s


def _csv_text(rows: list[dict], cols: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def read_eval_csvs(workdir) -> dict[str, list[dict]]:
    """evals/NAME.csv -> {NAME: [{'step': int, column: float}]}."""
    out = {}
    for path in sorted(Path(workdir, EVAL_DIR).glob("*.csv")):
        rows = list(csv.DictReader(io.StringIO(path.read_text())))
        out[path.stem] = [{k: (int(v) if k == "step" else float(v)) for k, v in r.items()} for r in rows]
    return out
