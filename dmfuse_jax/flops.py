"""Analytic FLOP counts of the model, the same on every backend: the basis of TFLOP/s, % of peak and MFU.

What is counted: every convolution (`conv_general_dilated`) and every matmul/einsum (`dot_general`:
dense layers, both attention matmuls, the criss-cross energies and their weighted sums) of the traced
program, at 2 FLOPs per multiply-add, from the operand and result shapes alone. A `scan` counts
`length` times its body, a `cond` its most expensive branch. Elementwise work (GroupNorm, SiLU,
softmax, the optimizer) is not counted: it is memory-bound, and MFU conventionally leaves it out.

Why not XLA's cost analysis: on GPU it does not see cuDNN convolutions and custom kernels (it reported
19-28 GFLOP for a 576x768 TNO pair that costs 3.748 TFLOP: `fuse_pairs` of configs/dmfuse_quarter.py,
benchmarks/RESULTS.md), so the same model got a different count on
every backend. Here the program is traced with the portable implementations (`models.builders.portable_config`:
XLA self-attention, the jnp criss-cross reference), whose matmuls are exactly those the fused
kernels perform, so the count does not depend on the backend or the implementation chosen.

For a training step the traced program is the real step (forward, backward through `jax.grad`,
optimizer): its backward convolutions and matmuls are counted as traced (about 2x the forward for
every layer whose weights train; a frozen UNet, stage 2, counts its forward only), not estimated.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.extend
import jax.numpy as jnp

from dmfuse_jax.models.builders import portable_config  # noqa: F401 - part of this module's API


@dataclass(frozen=True)
class FlopCount:
    """FLOPs by kind (2 per multiply-add)."""

    conv: float = 0.0
    dot: float = 0.0

    @property
    def total(self) -> float:
        return self.conv + self.dot

    def __add__(self, other: "FlopCount") -> "FlopCount":
        return FlopCount(self.conv + other.conv, self.dot + other.dot)

    def scale(self, k: float) -> "FlopCount":
        return FlopCount(self.conv * k, self.dot * k)


def _conv_flops(eqn) -> float:
    out = eqn.outvars[0].aval.shape
    rhs = eqn.invars[1].aval.shape
    out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
    # each output element: a sum over the kernel window x its input features (per group)
    return 2.0 * math.prod(out) * math.prod(rhs) / rhs[out_feature_dim]


def _dot_flops(eqn) -> float:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)


UNCOUNTED = ("pallas_call", "custom_call", "cudnn")


def jaxpr_flops(jaxpr) -> FlopCount:
    """Convolution and matmul FLOPs of a (Closed)Jaxpr, recursing into sub-jaxprs. Raises on a
    primitive whose work it cannot see (a Pallas or custom call): trace a portable config instead."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = FlopCount()
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            total += FlopCount(conv=_conv_flops(eqn))
        elif name == "dot_general":
            total += FlopCount(dot=_dot_flops(eqn))
        elif any(u in name for u in UNCOUNTED):
            raise ValueError(f"cannot count the FLOPs of {name!r}: trace the portable config "
                             "(models.builders.portable_config) instead")
        elif name == "cond":
            branches = [jaxpr_flops(b) for b in eqn.params["branches"]]
            total += max(branches, key=lambda c: c.total)
        elif name == "while":
            raise ValueError("cannot count the FLOPs of a while loop (unknown trip count)")
        else:
            sub = FlopCount()
            for j in jax.extend.core.jaxprs_in_params(eqn.params):
                sub += jaxpr_flops(j)
            total += sub.scale(eqn.params["length"]) if name == "scan" else sub
    return total


def count(fn: Callable, *args: Any) -> FlopCount:
    """FLOPs of one call `fn(*args)`, traced only (args may be ShapeDtypeStructs); `fn` may be jitted
    (traced through `.trace`, as a jit with compile options cannot nest)."""
    if hasattr(fn, "trace"):
        return jaxpr_flops(fn.trace(*args).jaxpr)
    return jaxpr_flops(jax.make_jaxpr(fn)(*args))


def unet_forward(config, height: int, width: int, batch: int = 1, taps: bool = False,
                 dtype: str | None = None) -> FlopCount:
    """One UNet forward of `batch` images of height x width (`taps`: stops after the last tap)."""
    from dmfuse_jax.models import build_unet

    unet = build_unet(portable_config(config), dtype)
    x = jax.ShapeDtypeStruct((batch, height, width, unet.in_channels), jnp.float32)
    g = jax.ShapeDtypeStruct((batch,), jnp.float32)
    params = jax.eval_shape(lambda x, g: unet.init(jax.random.PRNGKey(0), x, g), x, g)["params"]
    return count(lambda p, x, g: unet.apply({"params": p}, x, g, taps=taps), params, x, g)


def fuse_pairs(config, height: int, width: int, batch: int = 1, dtype: str | None = None) -> FlopCount:
    """Fusing `batch` pairs of height x width (padded to the UNet stride as the model does): the
    taps-only UNet passes (2 modalities x len(timesteps)) plus the fusion head."""
    from dmfuse_jax.models import build_dmfuse

    model = build_dmfuse(portable_config(config), dtype)
    img = jax.ShapeDtypeStruct((batch, height, width, 1), jnp.float32)
    rngs = {"params": jax.random.PRNGKey(0), "noise": jax.random.PRNGKey(0)}
    params = jax.eval_shape(lambda a: model.init(rngs, a, a, method=model.init_all), img)["params"]
    return count(lambda p, a, b: model.apply({"params": p}, a, b, rngs={"noise": jax.random.PRNGKey(0)}),
                 params, img, img)


def train_step(config, batch_size: int | None = None) -> FlopCount:
    """One training step of `config`'s stage (pretrain or fusion) at its batch size: forward,
    backward and optimizer as traced (see the module docstring for what counts)."""
    from dmfuse_jax.training.train import build_stage
    from dmfuse_jax.training.trainer import Trainer

    config = portable_config(config)
    with config.unlocked():
        if batch_size is not None:
            config.batch_size = batch_size
        if "sharding" in config:  # the count does not depend on the mesh: trace on this host's devices
            config.sharding.mesh_shape = (-1, 1)
    stage = build_stage(config)
    trainer = Trainer(config, stage, total_steps=1000)
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
             for k, v in stage.example_batch(int(config.batch_size)).items()}
    # the jitted step, traced under its mesh (as Trainer.train_step runs it; set_mesh cannot nest in a trace)
    with jax.set_mesh(trainer.mesh):
        return count(trainer._train_step, trainer.abstract_state, batch)


def xla_flops(compiled) -> float:
    """XLA's own count from a compiled executable's cost analysis (includes elementwise work; on GPU
    it misses cuDNN convolutions): for comparison only."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", float("nan")))
