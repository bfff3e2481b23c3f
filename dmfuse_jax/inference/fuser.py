"""The Python API: `load(checkpoint) -> Fuser`; `fuser(ir, vis) -> fused` on numpy arrays.

    import dmfuse_jax
    fuser = dmfuse_jax.load("runs/fusion")           # workdir, bundle or "UNET.pth,HEAD.pth"
    fused = fuser(ir, vis)                            # uint8 / uint16 / float [0, 1]; grey or RGB

A `Fuser` runs the model on luminance only (colour goes through `colour.py`). Images are padded to
a shape bucket (`buckets.py`) and stacked into batches; every (batch, height, width) bucket is
compiled once, ahead of time, and the executable is cached for the process (shared by all Fusers of
the same config). The diffusion noise comes from `seed`: every image of a call uses the key
`PRNGKey(seed)` (the noise then depends only on the seed and the bucket shape, not on the batch it
was fused in), so the same input and seed give the same output.

Memory plan (`Fuser.memory_plan`, `memory.py`): before a bucket's first batch runs, its compiled
executable's needs (`compiled.memory_analysis()`) are compared with what the device has free (host
RAM on CPU, `memory_stats()` on GPU and TPU). The plan takes the first of: the six UNet passes
batched at the requested batch; the passes in sequence; smaller batches; and the executable it
compiled to decide is the one that fuses. When nothing fits, `UserError` (one line: size, bytes
needed, bytes available, the largest square that would fit) before any image of that bucket runs.
"""
from __future__ import annotations

import functools
import time
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from dmfuse_jax import compilation
from dmfuse_jax.errors import UserError
from dmfuse_jax.inference import buckets, colour
from dmfuse_jax.inference.colour import FuseInputError  # noqa: F401 - part of the API (bad arrays)
from dmfuse_jax.models.params import cached_model, check_params_fit, config_key, param_signature
from dmfuse_jax.models.params import random_params  # noqa: F401 - part of the API (random models)

# Incremented each time the fuse function is traced (a Python side effect runs only while tracing):
# tests use it to prove that a folder of mixed sizes compiles once per bucket, not once per image.
TRACE_COUNT = [0]


def fuse_function(model, input_range: str, passes: str = "batched") -> Callable:
    """fn(params, ir, vi, seed) -> fused: ir, vi (B, H, W, 1) float32 in [0, 1], H and W multiples
    of the UNet stride; seed int32 scalar. Returns (B, H, W, 1) float32 in [0, 1].

    Each image runs as its own batch-1 model call under vmap with the same key, so its noise (and
    result) does not depend on which other images share the batch. `passes`: 'batched' (the
    model's own forward: the UNet on all timesteps x modalities at once) or 'sequential'
    (`models.dmfuse.fuse_in_sequence`: one UNet pass at a time, less memory, the same result).
    """
    import jax
    import jax.numpy as jnp

    from dmfuse_jax.data.images import from_model_range, to_model_range
    from dmfuse_jax.models.dmfuse import fuse_in_sequence

    if passes not in ("batched", "sequential"):
        raise ValueError(f"unknown passes {passes!r} (expected batched or sequential)")

    def forward(params, ir, vi, key):
        if passes == "sequential":
            return fuse_in_sequence(model, params, ir, vi, key)
        return model.apply({"params": params}, ir, vi, rngs={"noise": key})

    def one(params, ir, vi, key):
        y = forward(params, to_model_range(ir[None], input_range),
                    to_model_range(vi[None], input_range), key)
        return from_model_range(y[0].astype(jnp.float32), input_range)

    def fuse(params, ir, vi, seed):
        TRACE_COUNT[0] += 1
        key = jax.random.PRNGKey(seed)
        return jax.vmap(one, in_axes=(None, 0, 0, None))(params, ir, vi, key)
    return fuse


# (config key, batch, height, width) -> compiled executable, for the whole process.
_EXECUTABLES: dict[tuple, Any] = {}


@functools.lru_cache(maxsize=32)
def _jitted(key: str, passes: str = "batched"):
    model, config = cached_model(key)
    return compilation.jit(fuse_function(model, config.model.input_range, passes))


@dataclass
class Pending:
    """A dispatched batch: `result()` blocks and returns the cropped fused luminance images.
    `_out`: one device array (B, H, W, 1), or a list of them (a batch the memory plan split)."""

    _out: Any
    _sizes: list
    _host: list | None = None

    def result(self) -> list[np.ndarray]:
        if self._host is None:
            outs = self._out if isinstance(self._out, list) else [self._out]
            arr = np.concatenate([np.asarray(o) for o in outs]) if len(outs) > 1 else np.asarray(outs[0])
            self._host = [arr[i, :h, :w] for i, (h, w) in enumerate(self._sizes)]
        return self._host


@dataclass(kw_only=True)  # keyword-only, so a subclass's own fields come first: Fuser(config, params)
class PairFusion:
    """The shared front: array checks, size matching, colour routing. Subclasses fuse luminance.

    `__call__(ir, vis)` fuses one pair: numpy (H, W), (H, W, 1), (H, W, 3) or RGBA, uint8, uint16
    (see `sixteen_bit`) or float in [0, 1]. Returns float32 in [0, 1]: (H, W) when both inputs are
    grey, (H, W, 3) when one is colour (its chroma is kept, see `mode`).
    """

    mode: str = "auto"
    sixteen_bit: str = "minmax"
    # executables of this instance: 'compiled' and 'loaded' (from the executable cache) shapes;
    # seconds: 'executables_s' in all = 'trace_s' + 'lower_s' + 'compile_s' (XLA, or JAX's cache) + 'load_s'
    stats: dict = field(default_factory=lambda: {"executables_s": 0.0, "compiled": [], "loaded": [], "trace_s": 0.0,
                                                 "lower_s": 0.0, "compile_s": 0.0, "load_s": 0.0},
                        init=False, repr=False)
    # one-line notes for the user (e.g. an executable-cache entry that was not used)
    notes: list = field(default_factory=list, init=False, repr=False)

    def dispatch(self, irs: Sequence[np.ndarray], vis: Sequence[np.ndarray], batch: int | None = None,
                 shape: tuple[int, int] | None = None) -> Pending:
        raise NotImplementedError

    def bucket_multiple(self) -> int:
        """Images are grouped (and padded) to multiples of this; 1 = exact sizes."""
        return 1

    def bucket_limit(self) -> int | None:
        """At most this many bucket shapes per call (`buckets.merge_buckets`); None = no merging."""
        return None

    def plan(self, sizes: Sequence[tuple[int, int]], batch_size: int):
        """`buckets.plan_batches` with this fuser's bucket policy: [((B, Hb, Wb), [indices]), ...]."""
        return buckets.plan_batches(sizes, self.bucket_multiple(), batch_size, self.bucket_limit())

    def fuse_luma(self, irs: Sequence[np.ndarray], vis: Sequence[np.ndarray], batch_size: int = 8) -> list[np.ndarray]:
        """Luminance pairs (H_i, W_i, 1) in [0, 1] -> fused (H_i, W_i, 1), batched by bucket."""
        plan = self.plan([x.shape[:2] for x in irs], batch_size)
        out: list = [None] * len(irs)
        for (b, hb, wb), idx in plan:
            res = self.dispatch([irs[i] for i in idx], [vis[i] for i in idx], batch=b, shape=(hb, wb)).result()
            for i, r in zip(idx, res):
                out[i] = r
        return out

    def __call__(self, ir, vis, *, mode: str | None = None, resize: bool = False) -> np.ndarray:
        a = colour.normalise_array(ir, "ir", sixteen_bit=self.sixteen_bit)
        b = colour.normalise_array(vis, "vis", sixteen_bit=self.sixteen_bit)
        a = colour.match_sizes(a, b, resize=resize, ir_name="ir", vis_name="vis")
        pair = colour.prepare_pair(a, b, mode or self.mode)
        [fused] = self.fuse_luma([pair.ir], [pair.vi])
        return colour.finish(fused, pair)


@dataclass
class Fuser(PairFusion):
    """DMFuse with given params. Build with `load(checkpoint)` or `Fuser(config, params)`.

    config: the model config; params: {'unet', 'head'} numpy tree; seed: diffusion noise seed;
    bucket: shape-bucket multiple and max_buckets: at most this many bucket shapes per call
    (see `buckets.py`; None: one per rounded shape); dtype: compute dtype override ('float32',
    'bfloat16'); source: where the params came from (for messages); passes: the UNet passes,
    'auto' (the memory plan chooses, see `memory_plan`), 'batched' or 'sequential' (forced; the
    plan still checks the memory and may shrink the batch).
    """

    config: Any = None  # positional: Fuser(config, params); the rest by keyword only
    params: Any = None
    _: KW_ONLY
    seed: int = 0
    bucket: int = buckets.DEFAULT_MULTIPLE
    max_buckets: int | None = buckets.DEFAULT_MAX_BUCKETS
    dtype: str | None = None
    source: str = ""
    passes: str = "auto"

    def __post_init__(self):
        import jax

        if self.config is None or self.params is None:
            raise TypeError("Fuser needs a config and params (or use dmfuse_jax.load(checkpoint))")
        check_params_fit(self.config, self.params, self.source or "params")
        self._key = config_key(self.config, self.dtype)
        model, _ = cached_model(self._key)
        self.stride = model.unet.total_stride
        buckets.check_multiple(self.bucket, self.stride)
        if self.passes not in ("auto", "batched", "sequential"):
            raise ValueError(f"passes {self.passes!r}: expected auto, batched or sequential")
        self._device_params = jax.device_put(jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), self.params))
        self._param_sig = param_signature(self._device_params)

    def bucket_multiple(self) -> int:
        return self.bucket

    def bucket_limit(self) -> int | None:
        return self.max_buckets or None

    def program(self, b: int, hb: int, wb: int, passes: str = "batched") -> dict:
        """What decides the compiled fuse function of one (batch, bucket, passes), besides the
        environment: its key in the executable cache (`executable_cache.py`)."""
        return {"fn": "fuse", "config": self._key, "passes": passes, "batch": b, "height": hb, "width": wb,
                "params": self._param_sig}

    def _executable(self, b: int, hb: int, wb: int, passes: str = "batched"):
        """The compiled fuse function of one (batch, bucket, passes): from this process's table, else
        the executable cache (`executable_cache.py`: loaded without tracing), else compiled."""
        import jax
        import jax.numpy as jnp

        from dmfuse_jax import executable_cache

        shape = (b, hb, wb) if passes == "batched" else (b, hb, wb, passes)
        key = (self._key,) + shape
        exe = _EXECUTABLES.get(key)
        if exe is None:
            t = time.perf_counter()
            img = jax.ShapeDtypeStruct((b, hb, wb, 1), jnp.float32)
            seed = jax.ShapeDtypeStruct((), jnp.int32)
            program = self.program(b, hb, wb, passes)
            in_tree = jax.tree_util.tree_structure(((self._device_params, 0, 0, 0), {}))
            out_tree = jax.tree_util.tree_structure(0)
            timings: dict = {}
            exe = executable_cache.load_or_compile(
                "fuse", program, lambda: _jitted(self._key, passes).trace(self._device_params, img, img, seed),
                in_tree, out_tree, notes=self.notes, timings=timings)
            _EXECUTABLES[key] = exe
            for k in ("trace_s", "lower_s", "compile_s", "load_s"):
                self.stats[k] += timings.get(k, 0.0)
            self.stats["executables_s"] += time.perf_counter() - t
            self.stats["loaded" if timings.get("loaded") else "compiled"].append(shape)
        return exe

    def memory_plan(self, batch: int, height: int, width: int, ceiling: bool = False) -> "memory.MemoryPlan":
        """How a batch of `batch` images padded to (height, width) (a bucket) will run: the batch and
        UNet passes that fit the device's free memory, from the compiled executables' own needs
        (compiled here, and reused by `dispatch`). `.fits` False: nothing fits (`.line()` says why).
        Planned once per shape for the process (the free memory is read when first planned).
        `ceiling`: measure the largest square from one image in sequence (one more compile)."""
        from dmfuse_jax.inference import memory

        return memory.plan(self, batch, height, width, ceiling)

    def dispatch(self, irs, vis, batch=None, shape=None) -> Pending:
        """Starts fusing luminance images of ONE bucket (asynchronously): padded to `shape` (a plan's
        bucket; default: their common `bucket`-multiple shape); pads the batch to `batch`."""
        sizes = [x.shape[:2] for x in irs]
        if shape is None:
            shapes = {buckets.bucket_shape(h, w, self.bucket) for h, w in sizes}
            if len(shapes) != 1:
                raise ValueError(f"dispatch takes images of one bucket, got buckets {sorted(shapes)}")
            (shape,) = shapes
        hb, wb = shape
        if hb % self.stride or wb % self.stride or any(h > hb or w > wb for h, w in sizes):
            raise ValueError(f"bucket {hb}x{wb} is not a multiple of the UNet stride {self.stride} "
                             f"or does not cover the sizes {sorted(set(sizes))}")
        b = max(batch or len(irs), len(irs))
        plan = self.memory_plan(b, hb, wb)
        if not plan.fits:
            named = ", ".join(f"{w}x{h}" for h, w in sorted(set(sizes)))
            raise UserError(plan.line(f"{named} (bucket {wb}x{hb})" if (hb, wb) not in set(sizes) else None))
        exe = self._executable(plan.batch, hb, wb, plan.passes)
        ir = np.stack([buckets.pad_to(x, (hb, wb)) for x in irs])
        vi = np.stack([buckets.pad_to(x, (hb, wb)) for x in vis])
        n = -(-len(irs) // plan.batch) * plan.batch  # the plan's batch may be smaller than b
        if n > len(irs):  # a short last batch reuses the bucket's executable: repeat the last image
            rep = n - len(irs)
            ir = np.concatenate([ir, np.repeat(ir[-1:], rep, 0)])
            vi = np.concatenate([vi, np.repeat(vi[-1:], rep, 0)])
        outs = [exe(self._device_params, ir[i:i + plan.batch], vi[i:i + plan.batch], np.int32(self.seed))
                for i in range(0, n, plan.batch)]
        return Pending(outs if len(outs) > 1 else outs[0], sizes)


@dataclass
class MethodFuser(PairFusion):
    """A classical baseline (`dmfuse_jax.evaluation.baselines.BASELINES`) behind the same API."""

    method: str = "average"

    def __post_init__(self):
        from dmfuse_jax.evaluation.baselines import BASELINES

        if self.method not in BASELINES:
            raise UserError(f"method {self.method!r}: unknown method (choose from {', '.join(BASELINES)})")
        self._fn = BASELINES[self.method]
        self.source = f"method {self.method}"

    def dispatch(self, irs, vis, batch=None, shape=None) -> Pending:
        outs = [np.clip(np.asarray(self._fn(a[..., 0], b[..., 0]), np.float32), 0, 1)[..., None]
                for a, b in zip(irs, vis)]
        return Pending(None, [o.shape[:2] for o in outs], outs)


def load(checkpoint: str | None = None, *, config=None, ema: bool | None = None, seed: int = 0,
         bucket: int = buckets.DEFAULT_MULTIPLE, max_buckets: int | None = buckets.DEFAULT_MAX_BUCKETS,
         dtype: str | None = None, mode: str = "auto", sixteen_bit: str = "minmax", passes: str = "auto") -> Fuser:
    """A `Fuser` from a checkpoint: a training workdir, an inference bundle, or "UNET.pth,HEAD.pth"
    (then `config`, a config file or ConfigDict, is required). None: the bundled default model, with
    the head of `mode` (mode="medical": the medical head, `checkpoints.MODE_HEADS`).
    `passes`: see `Fuser` (default: the memory plan chooses).
    See `checkpoints.resolve` for the details; `ema`: None = EMA params when the workdir has them."""
    from dmfuse_jax.inference.checkpoints import resolve

    ck = resolve(checkpoint, config=config, ema=ema, mode=mode)
    return Fuser(config=ck.config, params=ck.params, seed=seed, bucket=bucket, max_buckets=max_buckets,
                 dtype=dtype, mode=mode,
                 sixteen_bit=sixteen_bit, source=ck.source, passes=passes)
