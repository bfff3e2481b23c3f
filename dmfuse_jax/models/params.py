"""A config's model and its param tree: the model built once per config, the param shapes (traced,
never computed), random params, and the check that params fit a config. Shared by `fuser`,
`checkpoints` and `export` (below all three, so none imports another in a circle).
"""
from __future__ import annotations

import functools
import json
from typing import Any

import numpy as np

from dmfuse_jax.errors import UserError


def config_key(config, dtype: str | None = None) -> str:
    """The parts of a config that decide the model (and so a compiled function), as canonical JSON."""
    model = json.loads(config.model.to_json_best_effort())
    if dtype:
        model["dtype"] = dtype
    return json.dumps({"model": model, "diffusion": json.loads(config.diffusion.to_json_best_effort())},
                      sort_keys=True)


def _config_from_key(key: str):
    from dmfuse_jax.config_lib import config_from_json
    return config_from_json(key)


@functools.lru_cache(maxsize=16)
def cached_model(key: str):
    """(model, config) of a `config_key`, built once per process."""
    from dmfuse_jax.models import build_dmfuse
    config = _config_from_key(key)
    return build_dmfuse(config, config.model.get("dtype", "float32")), config


def _traced_param_shapes(key: str):
    import jax
    import jax.numpy as jnp

    model, _ = cached_model(key)
    s = 2 * model.unet.total_stride
    x = jnp.zeros((1, s, s, 1), jnp.float32)
    rngs = {"params": jax.random.PRNGKey(0), "noise": jax.random.PRNGKey(0)}
    return jax.eval_shape(lambda: model.init(rngs, x, x, method=model.init_all))["params"]


@functools.lru_cache(maxsize=16)
def _param_shapes(key: str):
    """Traced once per config and stored in the executable cache (when on), as tracing the model's
    init costs seconds for the paper-size UNet and a warm start should not pay it."""
    import jax
    from flax import traverse_util

    from dmfuse_jax import executable_cache

    def compute():
        flat = traverse_util.flatten_dict(_traced_param_shapes(key), sep="/")
        return {k: [list(v.shape), str(v.dtype)] for k, v in flat.items()}

    if executable_cache.folder() is None:
        return _traced_param_shapes(key)
    flat = executable_cache.cached_json("param_shapes", {"config": key}, compute)
    return traverse_util.unflatten_dict({k: jax.ShapeDtypeStruct(tuple(s), d) for k, (s, d) in flat.items()}, sep="/")


def param_shapes(config) -> Any:
    """The param tree of `config`'s model as ShapeDtypeStructs (traced, never computed)."""
    return _param_shapes(config_key(config))


def param_signature(params) -> str:
    """sha256 of a param tree's paths, shapes and dtypes (what a compiled function's inputs are)."""
    import hashlib

    import jax

    rows = [(jax.tree_util.keystr(k), tuple(np.shape(a)), str(getattr(a, "dtype", np.asarray(a).dtype)))
            for k, a in jax.tree_util.tree_flatten_with_path(params)[0]]
    return hashlib.sha256(repr(rows).encode()).hexdigest()


def random_params(config, seed: int = 0) -> dict:
    """Random float32 numpy params for `config` without running flax init (fast on CPU), with CAIM's
    gamma set to 0.1 (non-zero, so the attention path matters). For tests, demos and benchmarks."""
    from dmfuse_jax.models.init import params_from_shapes

    params = params_from_shapes(param_shapes(config), seed)
    params["head"]["crossatten"]["gamma"] = np.full((1,), 0.1, np.float32)
    return params


def check_params_fit(config, params, source: str, config_name: str = "the config") -> None:
    """Errors (naming `source`) unless `params` has exactly the shapes `config`'s model needs."""
    from flax import traverse_util

    want = {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(param_shapes(config)).items()}
    try:
        have = {"/".join(k): tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(params).items()}
    except Exception:  # noqa: BLE001 - not a nested dict of arrays
        raise UserError(f"{source}: params are not a tree of arrays") from None
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    misshaped = [f"{k}: {have[k]} (config needs {want[k]})" for k in sorted(set(want) & set(have))
                 if have[k] != want[k]]
    if missing or unexpected or misshaped:
        u = config.model.unet
        lines = [f"{source}: checkpoint does not fit {config_name} (UNet width {u.inner_channels}, "
                 f"mults {tuple(u.channel_mults)}, {u.res_blocks} res blocks): a checkpoint of another config?"]
        for what, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                lines.append(f"  {what} ({len(items)}): " + "; ".join(items[:8]) + (" ..." if len(items) > 8 else ""))
        raise UserError("\n".join(lines))
