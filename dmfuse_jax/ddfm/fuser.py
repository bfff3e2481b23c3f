"""`DDFMFuser`: DDFM behind the `PairFusion` API that `dmfuse fuse` uses (same I/O, colour, errors).

Per pair: luminance in [0, 1] -> grey in [-1, 1]; H and W reflect-padded up to a multiple of the
prior's stride and cropped back (the authors crop to a multiple of 32 instead); x_start drawn from
`seed` at the padded size, the same for every pair (the authors reseed before every image);
sampling runs in chunks of steps (`sampler.chunk_length`) so that a progress bar can advance between
chunks without a host callback inside the compiled loop; the result is the final sample's luminance,
min-max stretched (cropped first, so padding never moves the stretch).

Input order: by default I (the EM's first image) is the VISIBLE image and V the infrared, as the
authors' `sample.py` passes them (it reads `inf_img` from the `vi` folder); `i_source='ir'` swaps.
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


@dataclass
class DDFMFuser(PairFusion):
    """prior: a `priors.Prior`; steps: respaced DDIM steps; seed: x_start seed; progress: a step bar."""

    prior: Any = None
    steps: int = 100
    seed: int = 3407
    lamb: float = 0.5
    rho: float = 0.001
    i_source: str = "vis"
    progress: bool = True
    timing: dict = field(default_factory=lambda: {"sample_s": 0.0, "steps": 0}, init=False, repr=False)

    def __post_init__(self):
        import jax

        from dmfuse_jax.ddfm.sampler import Sampler, respaced_tables
        from dmfuse_jax.errors import UserError

        if self.prior is None:
            raise TypeError("DDFMFuser needs a prior (dmfuse_jax.ddfm.priors.load_prior)")
        if self.i_source not in ("vis", "ir"):
            raise ValueError(f"i_source must be 'vis' or 'ir', got {self.i_source!r}")
        if self.steps < 1:
            raise UserError(f"--steps {self.steps}: must be >= 1")
        try:
            tables = respaced_tables(self.prior.betas, str(int(self.steps)))
        except ValueError as e:
            raise UserError(f"--steps {self.steps}: {e} (the prior has {len(self.prior.betas)} timesteps)") from None
        self.sampler = Sampler(self.prior.module, self.prior.kind, tables, float(self.lamb), float(self.rho))
        self.source = self.prior.source
        self._compiled: dict = {}
        self._params = jax.device_put(jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), self.prior.params))

    def bucket_multiple(self) -> int:
        return self.prior.stride

    def sample(self, I: np.ndarray, V: np.ndarray) -> np.ndarray:
        """Grey I, V (B, H, W) in [-1, 1], H and W multiples of the stride -> final samples (B, H, W, C)."""
        import jax
        import jax.numpy as jnp

        from dmfuse_jax.ddfm.sampler import chunk_length, jitted_chunk

        b, h, w = I.shape
        c = self.prior.module.in_channels
        x_start = jax.random.normal(jax.random.PRNGKey(self.seed), (h, w, c), jnp.float32)
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
        Padded to `shape` (a plan's bucket; default: their common stride-multiple shape)."""
        from dmfuse_jax.ddfm.sampler import fused_luminance

        sizes = [x.shape[:2] for x in irs]
        if shape is None:
            shapes = {buckets.bucket_shape(h, w, self.bucket_multiple()) for h, w in sizes}
            if len(shapes) != 1:
                raise ValueError(f"dispatch takes images of one bucket, got buckets {sorted(shapes)}")
            (shape,) = shapes
        hb, wb = shape
        # DDFM's inputs are grey in [-1, 1] whatever the prior (the EM works in that range)
        ir = to_model_range(np.stack([buckets.pad_to(x, (hb, wb))[..., 0] for x in irs]).astype(np.float32), "-1_1")
        vi = to_model_range(np.stack([buckets.pad_to(x, (hb, wb))[..., 0] for x in vis]).astype(np.float32), "-1_1")
        I, V = (vi, ir) if self.i_source == "vis" else (ir, vi)
        x = self.sample(I, V)
        outs = [fused_luminance(x[i, :h, :w])[..., None].astype(np.float32) for i, (h, w) in enumerate(sizes)]
        return Pending(None, sizes, outs)
