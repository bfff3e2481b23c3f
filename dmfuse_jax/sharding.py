"""Device mesh and shardings: batch on ('data', 'fsdp'), large params and optimizer state on 'fsdp'.

Logical axis names map to mesh axes through `RULES` (one table, not scattered PartitionSpecs):
  'batch' -> ('data', 'fsdp')   every device holds a slice of the batch (data parallel + FSDP)
  'fsdp'  -> 'fsdp'             the dimension of a large array split across the parameter axis
With fsdp = 1 this is plain data parallelism: params replicated, gradients all-reduced by XLA.
The same code runs on 1 device, N local devices and N hosts (a global mesh over jax.devices()).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dmfuse_jax.errors import UserError

AXES = ("data", "fsdp")
RULES: dict[str, Any] = {"batch": ("data", "fsdp"), "fsdp": "fsdp"}


def logical_spec(names: Sequence[str | None], rules: dict[str, Any] = RULES) -> P:
    """('batch', None, None, None) -> PartitionSpec(('data', 'fsdp'), None, None, None)."""
    return P(*(None if n is None else rules[n] for n in names))


def make_mesh(mesh_shape: Sequence[int] = (-1, 1), devices=None) -> Mesh:
    """A (data, fsdp) mesh over all devices (every process's) or `devices`; one entry may be -1 (the
    rest). Devices of several TPU slices get a hybrid mesh with the data axis over the slices."""
    devices = list(jax.devices() if devices is None else devices)
    shape = list(mesh_shape)
    if len(shape) != len(AXES):
        raise UserError(f"sharding.mesh_shape must have {len(AXES)} entries {AXES}, got {tuple(mesh_shape)}")
    if shape.count(-1) > 1:
        raise UserError(f"sharding.mesh_shape {tuple(mesh_shape)}: at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise UserError(f"sharding.mesh_shape {tuple(mesh_shape)} does not divide {len(devices)} devices")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise UserError(f"sharding.mesh_shape {tuple(shape)} needs {math.prod(shape)} devices, "
                        f"there are {len(devices)}")
    from jax.experimental import mesh_utils
    slices = num_slices(devices)
    if slices > 1:  # multi-slice: the data axis spans the slices (DCN), fsdp stays inside one (ICI)
        if shape[0] % slices:
            raise UserError(f"sharding.mesh_shape {tuple(shape)}: the data axis must be a multiple of the "
                            f"{slices} slices (it spans them over the data-center network)")
        grid = mesh_utils.create_hybrid_device_mesh([shape[0] // slices, shape[1]], [slices, 1], devices)
        return Mesh(grid, AXES)
    try:
        grid = mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # noqa: BLE001 - CPU / odd topologies: plain order is fine
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, AXES)


def num_slices(devices) -> int:
    """How many TPU slices (ICI domains) `devices` span: 1 unless the devices have `slice_index`."""
    return len({getattr(d, "slice_index", 0) or 0 for d in devices})


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over ('data', 'fsdp'); works for any rank."""
    return NamedSharding(mesh, logical_spec(("batch",)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape: Sequence[int], fsdp_size: int, min_size: int) -> P:
    """Split the largest dimension divisible by the fsdp axis (the last of equal ones) of arrays with
    at least `min_size` elements; smaller arrays (biases, norms, scalars) stay replicated."""
    if fsdp_size <= 1 or not shape or math.prod(shape) < min_size:
        return P()
    best = None
    for i, d in enumerate(shape):
        if d % fsdp_size == 0 and (best is None or d >= shape[best]):
            best = i
    if best is None:
        return P()
    names: list[str | None] = [None] * len(shape)
    names[best] = "fsdp"
    return logical_spec(names)


def state_shardings(abstract_tree: Any, mesh: Mesh, min_size: int = 2 ** 18) -> Any:
    """NamedShardings for a pytree of ShapeDtypeStructs (params, optimizer state, EMA...). The rule
    depends on the shape only, so Adam's moments get the same sharding as their parameter."""
    fsdp_size = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, fsdp_size, min_size)), abstract_tree)


def check_batch(global_batch: int, mesh: Mesh) -> None:
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch % n:
        raise UserError(f"batch_size {global_batch} is not divisible by the {n} devices of the "
                        f"mesh {dict(mesh.shape)}")
    if global_batch % jax.process_count():
        raise UserError(f"batch_size {global_batch} is not divisible by the {jax.process_count()} processes")


def put_tree(tree, shardings):
    """Host numpy pytree (the same on every process) -> global arrays with `shardings`."""
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx]),
                        tree, shardings)
