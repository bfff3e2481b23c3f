"""The training state (one pytree: what a checkpoint holds) and the optimizer built from config."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from dmfuse_jax.errors import UserError


@struct.dataclass
class TrainState:
    """step: () int32; params: the trained params; frozen: params that are not trained (stage 2's
    UNet; {} in stage 1); opt_state: optimizer state of `params`; ema_params: EMA of `params`;
    rng: (2,) uint32 key, split once per step."""

    step: jax.Array
    params: Any
    frozen: Any
    opt_state: Any
    ema_params: Any
    rng: jax.Array

    def split_items(self) -> tuple[dict, dict]:
        """(weights, rest): what `load_params` needs, and the optimizer/step/RNG part."""
        return ({"params": self.params, "frozen": self.frozen, "ema_params": self.ema_params},
                {"step": self.step, "opt_state": self.opt_state, "rng": self.rng})

    @classmethod
    def from_items(cls, weights: dict, rest: dict) -> "TrainState":
        return cls(step=rest["step"], params=weights["params"], frozen=weights["frozen"],
                   opt_state=rest["opt_state"], ema_params=weights["ema_params"], rng=rest["rng"])


def learning_rate_schedule(opt: Any, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 over `warmup_steps`, then 'constant' or 'cosine' decay to 0."""
    lr, warmup = float(opt.learning_rate), int(opt.get("warmup_steps", 0))
    kind = opt.get("schedule", "constant")
    if kind == "constant":
        after = optax.constant_schedule(lr)
    elif kind == "cosine":
        after = optax.cosine_decay_schedule(lr, max(1, total_steps - warmup))
    else:
        raise UserError(f"unknown optimizer.schedule {kind!r} (expected 'constant' or 'cosine')")
    if warmup <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


OPTIMIZERS = {
    "adam": lambda lr, o: optax.adam(lr, b1=o.get("b1", 0.9), b2=o.get("b2", 0.999), eps=o.get("eps", 1e-8)),
    "adamw": lambda lr, o: optax.adamw(lr, b1=o.get("b1", 0.9), b2=o.get("b2", 0.999), eps=o.get("eps", 1e-8),
                                       weight_decay=o.get("weight_decay", 0.0)),
}


def make_optimizer(opt: Any, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """config.optimizer -> (gradient transformation, learning-rate schedule).
    Gradient clipping by global norm first when `grad_clip` > 0."""
    name = opt.get("name", "adam")
    if name not in OPTIMIZERS:
        raise UserError(f"unknown optimizer.name {name!r} (expected one of {sorted(OPTIMIZERS)})")
    schedule = learning_rate_schedule(opt, total_steps)
    parts = []
    if opt.get("grad_clip", 0.0) > 0:
        parts.append(optax.clip_by_global_norm(float(opt.grad_clip)))
    parts.append(OPTIMIZERS[name](schedule, opt))
    return optax.chain(*parts), schedule


def ema_update(ema: Any, params: Any, decay: float) -> Any:
    """ema <- decay * ema + (1 - decay) * params (decay 0: ema == params)."""
    if decay <= 0.0:
        return params
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p.astype(e.dtype), ema, params)


def apply_gradients(state: TrainState, grads: Any, tx: optax.GradientTransformation,
                    ema_decay: float, rng: jax.Array) -> TrainState:
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         ema_params=ema_update(state.ema_params, params, ema_decay), rng=rng)


def initial_state(params: Any, frozen: Any, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen,
                      opt_state=tx.init(params), ema_params=jax.tree.map(jnp.copy, params), rng=rng)
