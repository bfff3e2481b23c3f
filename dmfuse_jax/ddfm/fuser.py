"""`DDFMFuser`: DDFM behind the `PairFusion` API that `dmfuse fuse` uses (same I/O, colour, errors).

Settings come from a DDFM config (`ddfm/config.py`): `config`, else the prior's own (`Prior.config`),
else `ddfm_config(prior='sr3')`'s defaults; `steps` and `seed`, when given, override the config's
`diffusion.timestep_respacing` and `seed`.

Per batch of one shape bucket (`PairFusion.plan`: H and W rounded up to multiples of `bucket`, merged
down to `max_buckets` shapes, cut into batches; a short last batch is filled by repeating its last
pair, so each bucket compiles once): luminance in [0, 1] -> grey in [-1, 1]; reflect-padded at the
bottom/right to the bucket and cropped back (the authors crop to a multiple of 32 instead); x_start
drawn from `seed` at the bucket size, the same for every pair (the authors reseed before every image);
sampling runs in chunks of steps (`sampler.chunk_length`) so that a progress bar can advance between
chunks without a host callback inside the compiled loop; the result is the final sample's luminance,
min-max stretched (cropped first, so padding never moves the stretch).

Input order: by default I (the EM's first image) is the VISIBLE image and V the infrared, as the
authors' `sample.py` passes them (it reads `inf_img` from the `vi` folder); `i_source='ir'` swaps.

Bad settings raise `SettingError` (a ValueError naming the parameter or config key: `steps 0: ...`);
`dmfuse fuse` turns the parameter names into its flags.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dmfuse_jax.data.images import to_model_range
from dmfuse_jax.inference import buckets
from dmfuse_jax.inference.fuser import Pending, PairFusion


class SettingError(ValueError):
    """A bad DDFMFuser setting: `name` (a parameter, or a config key such as 'config.em.rho'), its value
    and why."""

    def __init__(self, name: str, value, reason: str):
        self.name, self.value, self.reason = name, value, reason
        super().__init__(f"{name} {value}: {reason}")


@dataclass
class DDFMFuser(PairFusion):
    """prior: a `priors.Prior`; config: a DDFM config (None: see the module docstring); steps: respaced
    DDIM steps (an int or a `space_timesteps` spec such as 'ddim50'; None: the config's
    diffusion.timestep_respacing); seed: x_start seed (None: the config's); bucket: shape-bucket
    multiple, a multiple of the prior's stride (None: 64 rounded up to one); max_buckets: at most
    this many bucket shapes per call (None or 0: no merging); progress: a step bar."""

    prior: Any = None
    config: Any = None
    steps: Any = None
    seed: int | None = None
    bucket: int | None = None
    max_buckets: int | None = buckets.DEFAULT_MAX_BUCKETS
    i_source: str = "vis"
    progress: bool = True
    timing: dict = field(default_factory=lambda: {"sample_s": 0.0, "steps": 0}, init=False, repr=False)

    def __post_init__(self):
        import jax

        from dmfuse_jax.ddfm.config import ddfm_config
        from dmfuse_jax.ddfm.sampler import Sampler
        from dmfuse_jax.diffusion.respace import respaced_tables

        if self.prior is None:
            raise TypeError("DDFMFuser needs a prior (dmfuse_jax.ddfm.priors.load_prior)")
        if self.i_source not in ("vis", "ir"):
            raise SettingError("i_source", repr(self.i_source), "must be 'vis' or 'ir'")
        cfg = self.config or self.prior.config or ddfm_config(prior=self.prior.kind)
        if cfg.prior != self.prior.kind:
            raise SettingError("config.prior", repr(cfg.prior), f"the prior is a {self.prior.kind} prior")
        self.settings = cfg
        if self.steps is None:
            name, respacing = "config.diffusion.timestep_respacing", cfg.diffusion.timestep_respacing
        else:
            name, respacing = "steps", self.steps
            if isinstance(respacing, (int, np.integer)) and respacing < 1:
                raise SettingError(name, respacing, "must be >= 1")
        try:
            tables = respaced_tables(self.prior.betas, str(respacing))
        except ValueError as e:
            raise SettingError(name, respacing, f"{e} (the prior has {len(self.prior.betas)} timesteps)") from None
        if tables.num_steps < 1:
            raise SettingError(name, respacing, "must give at least one step")
        self.seed_used = int(cfg.seed if self.seed is None else self.seed)
        stride = self.prior.stride
        if self.bucket is None:
            self.bucket = -(-buckets.DEFAULT_MULTIPLE // stride) * stride
        if self.bucket < 1 or self.bucket % stride:
            raise SettingError("bucket", self.bucket, f"must be a positive multiple of the prior's stride {stride}")
        if self.max_buckets is not None and self.max_buckets < 0:
            raise SettingError("max_buckets", self.max_buckets, "must be >= 0")
        self.sampler = Sampler(self.prior.module, self.prior.kind, tables, float(cfg.em.lamb), float(cfg.em.rho),
                               bool(cfg.diffusion.clip_denoised))
        self.source = self.prior.source
        self._compiled: dict = {}
        self._params = jax.device_put(jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), self.prior.params))

    def bucket_multiple(self) -> int:
        return self.bucket

    def bucket_limit(self) -> int | None:
        return self.max_buckets or None

    def sample(self, I: np.ndarray, V: np.ndarray) -> np.ndarray:
        """Grey I, V (B, H, W) in [-1, 1], H and W multiples of the stride -> final samples (B, H, W, C)."""
        import jax
        import jax.numpy as jnp

        from dmfuse_jax.ddfm.sampler import chunk_length, jitted_chunk

        b, h, w = I.shape
        c = self.prior.module.in_channels
        x_start = jax.random.normal(jax.random.PRNGKey(self.seed_used), (h, w, c), jnp.float32)
        carry = self.sampler.init(jnp.broadcast_to(x_start, (b, h, w, c)), I)
        n = self.sampler.num_steps
        length = chunk_length(n)
        fn = jitted_chunk(self.sampler, length)
        key = (b, h, w, length)
        if key not in self._compiled:
            t = time.perf_counter()
            self._compiled[key] = fn.lower(self._params, carry, I, V, jnp.int32(0)).compile()
            self.stats["compile_s"] += time.perf_counter() - t
            self.stats["compiled"].append(key)
        fn = self._compiled[key]
        from tqdm import tqdm

        bar = tqdm(total=n, unit="step", leave=False, disable=not self.progress or None, file=sys.stderr,
                   desc=f"DDFM {b}x{h}x{w}")
        t = time.perf_counter()
        for start in range(0, n, length):
            carry = fn(self._params, carry, I, V, jnp.int32(start))
            if self.progress:
                jax.block_until_ready(carry[0])  # the bar shows finished chunks
                bar.update(length)
        x = np.asarray(carry[0])
        bar.close()
        self.timing["sample_s"] += time.perf_counter() - t
        self.timing["steps"] += n
        return x

    def dispatch(self, irs, vis, batch=None, shape=None) -> Pending:
        """Luminance images (H_i, W_i, 1) in [0, 1] of ONE bucket -> Pending fused luminance in [0, 1].
        Padded to `shape` (a plan's bucket; default: their common `bucket`-multiple shape); the batch
        is filled up to `batch` by repeating the last pair (one compile per bucket)."""
        from dmfuse_jax.ddfm.sampler import fused_luminance

        sizes = [x.shape[:2] for x in irs]
        if shape is None:
            shapes = {buckets.bucket_shape(h, w, self.bucket) for h, w in sizes}
            if len(shapes) != 1:
                raise ValueError(f"dispatch takes images of one bucket, got buckets {sorted(shapes)}")
            (shape,) = shapes
        hb, wb = shape
        if hb % self.prior.stride or wb % self.prior.stride or any(h > hb or w > wb for h, w in sizes):
            raise ValueError(f"bucket {hb}x{wb} is not a multiple of the prior's stride {self.prior.stride} "
                             f"or does not cover the sizes {sorted(set(sizes))}")
        fill = max(batch or len(irs), len(irs)) - len(irs)
        irs, vis = list(irs) + [irs[-1]] * fill, list(vis) + [vis[-1]] * fill
        # DDFM's inputs are grey in [-1, 1] whatever the prior (the EM works in that range)
        ir = to_model_range(np.stack([buckets.pad_to(x, (hb, wb))[..., 0] for x in irs]).astype(np.float32), "-1_1")
        vi = to_model_range(np.stack([buckets.pad_to(x, (hb, wb))[..., 0] for x in vis]).astype(np.float32), "-1_1")
        I, V = (vi, ir) if self.i_source == "vis" else (ir, vi)
        x = self.sample(I, V)
        outs = [fused_luminance(x[i, :h, :w])[..., None].astype(np.float32) for i, (h, w) in enumerate(sizes)]
        return Pending(None, sizes, outs)
