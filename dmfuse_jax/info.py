"""`dmfuse info`: versions, devices, and the parameter and FLOP counts of a config's model."""
from __future__ import annotations

import argparse
import platform

from dmfuse_jax import compilation
from dmfuse_jax.config_lib import config_from_flags

# Takes --config.KEY=VALUE overrides (ml_collections config flags), as `dmfuse train`.
CONFIG_FLAGS = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="configs/dmfuse_quarter.py",
                        help="config file (default: %(default)s); override keys with --config.KEY=VALUE, "
                             "e.g. --config.model.unet.inner_channels=64 (the 1/2 model)")
    parser.add_argument("--size", type=int, default=256, help="square input size for the FLOP counts")
    parser.add_argument("--no-flops", action="store_true", help="skip compiling for the FLOP counts")


def count_params(tree) -> int:
    import jax
    return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))


def compiled_flops(fn, *args) -> float:
    """FLOPs of one call of `fn(*args)` from XLA's cost analysis of the compiled program."""
    cost = compilation.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost.get("flops", float("nan")))


def model_summary(config, size: int = 256, flops: bool = True) -> dict:
    """Parameter counts (UNet, head) and FLOPs (one UNet forward, one fused pair) at size x size."""
    import jax
    import jax.numpy as jnp

    from dmfuse_jax.models import build_dmfuse

    model = build_dmfuse(config)
    u = model.unet
    x = jnp.zeros((1, size, size, u.in_channels))
    g = jnp.ones((1,))
    pair = jnp.zeros((1, size, size, 1))
    shapes = jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0), "noise": jax.random.PRNGKey(0)},
                                               pair, pair, method=model.init_all))["params"]
    out = {"unet_params": count_params(shapes["unet"]), "head_params": count_params(shapes["head"])}
    if flops:
        zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        out["unet_forward_flops"] = compiled_flops(lambda p, x, g: u.apply({"params": p}, x, g), zeros["unet"], x, g)
        out["pair_fuse_flops"] = compiled_flops(
            lambda p, a, b: model.apply({"params": p}, a, b, rngs={"noise": jax.random.PRNGKey(0)}), zeros, pair, pair)
    return out


def run(args) -> int:
    import jax

    import dmfuse_jax

    config = config_from_flags(args.config, getattr(args, "config_flags", ()))
    versions = {"dmfuse-jax": dmfuse_jax.__version__, "python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "grain", "chex", "numpy"):
        try:
            mod = __import__(name, fromlist=["__version__"])
            versions[name] = getattr(mod, "__version__", "?")
        except ImportError:
            versions[name] = "not installed"
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"backend: {jax.default_backend()}, processes: {jax.process_count()}, "
          f"devices ({jax.device_count()}): " + ", ".join(str(d) for d in jax.devices()))
    u = config.model.unet
    print(f"config: {args.config} (UNet width {u.inner_channels}, mults {tuple(u.channel_mults)}, "
          f"in/out {u.in_channels}/{u.out_channels}, attention at {tuple(u.attn_res)} for image size {u.image_size})")
    s = model_summary(config, args.size, flops=not args.no_flops)
    print(f"UNet parameters:        {s['unet_params']:,}")
    print(f"fusion head parameters: {s['head_params']:,}")
    if "unet_forward_flops" in s:
        print(f"UNet forward, 1x{args.size}x{args.size}: {s['unet_forward_flops'] / 1e9:.1f} GFLOP (XLA cost analysis)")
        print(f"fuse one {args.size}x{args.size} pair (2 modalities x {len(config.model.timesteps)} steps, "
              f"taps only + head): {s['pair_fuse_flops'] / 1e9:.1f} GFLOP")
    return 0
