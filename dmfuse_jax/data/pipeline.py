"""Grain pipelines: deterministic shuffling, per-process sharding, batching, placement on the mesh.

Element order is a pure function of (seed, global index): the shuffled, transformed, infinitely
repeated stream is cut into global batches of `global_batch` consecutive elements, and process p of
n reads the p-th contiguous block of each global batch. So the global batch at step k is the same
whatever the number of processes, and the iterator state (grain's, checkpointed with the run) is
just a position in that stream.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import grain
import numpy as np

from dmfuse_jax.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_path(path: str, what: str = "path") -> Path:
    """A data path from a config: absolute as is; relative ones are tried against the working
    directory, then the repository root (so '../shared/data/...' works from anywhere); a leading
    '../shared/' is redirected to $DMFUSE_SHARED when that is set."""
    p = Path(os.path.expanduser(path))
    if p.is_absolute():
        return p
    shared = os.environ.get("DMFUSE_SHARED")
    candidates = []
    if shared and p.parts[:2] == ("..", "shared"):
        candidates.append(Path(shared).joinpath(*p.parts[2:]))
    candidates += [Path.cwd() / p, REPO_ROOT / p]
    for c in candidates:
        if c.exists():
            return c.resolve()
    raise UserError(f"{path}: {what} not found (tried {', '.join(str(c) for c in candidates)})")


class ProcessBlockShard(grain.MapDataset):
    """Process `index` of `count`: element j of its stream is global element
    (j // local) * global_batch + index * local + j % local, local = global_batch // count."""

    _MUTATES_ELEMENT_SPEC = False

    def __init__(self, parent: grain.MapDataset, *, global_batch: int, index: int, count: int):
        super().__init__(parent)
        if global_batch % count:
            raise UserError(f"batch_size {global_batch} is not divisible by the {count} processes")
        self._global, self._local, self._index = global_batch, global_batch // count, index
        self._length = (len(parent) // global_batch) * self._local

    def __len__(self) -> int:
        return self._length

    def _parent_index(self, j: int) -> int:
        return (j // self._local) * self._global + self._index * self._local + j % self._local

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._parent_index(index)]

    def __str__(self) -> str:
        return f"ProcessBlockShard(process {self._index}, {self._local} of {self._global} per batch)"


def train_dataset(source, transform: Callable | None, *, seed: int, global_batch: int,
                  process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """source -> shuffled (per epoch, from `seed`), transformed (random ops seeded per element),
    repeated forever, this process's block of every global batch, batched to (local, ...)."""
    if len(source) == 0:
        raise UserError(f"{source!r}: the data source is empty")
    ds = grain.MapDataset.source(source).shuffle(seed=seed % 2**32)
    if transform is not None:
        ds = ds.random_map(transform, seed=(seed + 1) % 2**32)
    ds = ds.repeat(None)
    ds = ProcessBlockShard(ds, global_batch=global_batch, index=process_index, count=process_count)
    return ds.batch(global_batch // process_count, drop_remainder=True)


def configure_grain() -> None:
    """grain reads its options from absl flags (`--grain_*`), and its multiprocess prefetch reads
    them before starting workers; a program that never parses absl flags (the dmfuse CLI, a script)
    gets `UnparsedFlagAccessError`. As grain's docs do for such programs: mark the flags parsed (they
    keep their defaults; a program that parsed them itself is left alone). Options can then be set
    with `grain.config.update(name, value)`."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def train_iterator(ds: grain.MapDataset, *, num_threads: int = 2, prefetch: int = 8,
                   worker_count: int = 0) -> grain.DatasetIterator:
    """A checkpointable iterator (`get_state`/`set_state`; grain's orbax handler saves it).

    worker_count > 0 decodes in that many worker processes (large image folders): each gets a pickled
    copy of `ds` (the source and transform must pickle: no locks, no open files) and produces every
    worker_count-th batch, so the batch order is the same as with no workers."""
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))
    if worker_count > 0:
        configure_grain()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(it_ds)


def place_batch(local: dict[str, np.ndarray], sharding) -> dict[str, Any]:
    """This process's rows of a global batch -> global jax Arrays sharded on the mesh's batch axes."""
    import jax
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def batch_shapes(ds: grain.MapDataset) -> dict[str, tuple[int, ...]]:
    """Shapes of one local batch (reads one batch)."""
    return {k: tuple(np.shape(v)) for k, v in ds[0].items()}
