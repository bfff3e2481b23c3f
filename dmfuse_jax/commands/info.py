"""`dmfuse info`: versions, devices, and the parameter and FLOP counts of a config's model."""
from __future__ import annotations

import argparse
import platform

from dmfuse_jax.config_lib import config_from_flags

# Takes --config.KEY=VALUE overrides (ml_collections config flags), as `dmfuse train`.
CONFIG_FLAGS = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="configs/dmfuse_quarter.py",
                        help="config file (default: %(default)s); override keys with --config.KEY=VALUE, "
                             "e.g. --config.model.unet.inner_channels=64 (the 1/2 model)")
    parser.add_argument("--size", type=int, default=256, help="square input size for the FLOP counts")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP counts")


def count_params(tree) -> int:
    import jax
    return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))


def model_summary(config, size: int = 256, flops: bool = True) -> dict:
    """Parameter counts (UNet, head) and analytic FLOPs (`dmfuse_jax.flops`: convolutions and matmuls,
    2 per multiply-add; traced, never compiled) of one UNet forward and one fused pair at size x size."""
    import jax
    import jax.numpy as jnp

    from dmfuse_jax import flops as flop_count
    from dmfuse_jax.models import build_dmfuse

    model = build_dmfuse(config)
    pair = jax.ShapeDtypeStruct((1, size, size, 1), jnp.float32)
    shapes = jax.eval_shape(lambda a: model.init({"params": jax.random.PRNGKey(0), "noise": jax.random.PRNGKey(0)},
                                                 a, a, method=model.init_all), pair)["params"]
    out = {"unet_params": count_params(shapes["unet"]), "head_params": count_params(shapes["head"])}
    if flops:
        out["unet_forward_flops"] = flop_count.unet_forward(config, size, size).total
        out["pair_fuse_flops"] = flop_count.fuse_pairs(config, size, size).total
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
        print(f"UNet forward, 1x{args.size}x{args.size}: {s['unet_forward_flops'] / 1e9:.1f} GFLOP "
              "(analytic: convolutions + matmuls, multiply-add = 2)")
        print(f"fuse one {args.size}x{args.size} pair (2 modalities x {len(config.model.timesteps)} steps, "
              f"taps only + head): {s['pair_fuse_flops'] / 1e9:.1f} GFLOP")
    return 0
