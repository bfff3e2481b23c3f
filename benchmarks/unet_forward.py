"""UNet forward time per image at 256x256 for a given batch, dtype and width, on whatever devices exist.

  python benchmarks/unet_forward.py --width 32 --batch 8 --dtype bfloat16
  python benchmarks/unet_forward.py --width 8 --batch 2 --size 128 --json out.json   # quick CPU check

The batch is sharded over all local devices on a 'data' mesh axis (it must divide evenly).
Prints one line of figures (and writes JSON with --json): ms per image, images/s, achieved TFLOP/s
(analytic FLOPs of `dmfuse_jax.flops`, convolutions and matmuls, / median time).
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dmfuse_jax import compilation, config_lib, flops as flop_count
from dmfuse_jax.models import build_unet


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=32, help="UNet inner channels (paper 1/4 model: 32)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--dtype", default="float32", choices=sorted(config_lib_dtypes()))
    ap.add_argument("--taps", action="store_true", help="feature-tap mode (stops after the last decoder tap)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", help="write the figures to this JSON file")
    args = ap.parse_args(argv)

    config = config_lib.base_config(width=args.width, norm_groups=min(32, args.width))
    config.model.dtype = args.dtype
    unet = build_unet(config)
    devices = np.array(jax.devices())
    mesh = Mesh(devices, ("data",))
    if args.batch % len(devices):
        raise SystemExit(f"--batch {args.batch} must be a multiple of the device count {len(devices)}")
    x = jax.device_put(jnp.asarray(np.random.default_rng(0).standard_normal((args.batch, args.size, args.size, 3)),
                                   jnp.float32), NamedSharding(mesh, P("data")))
    g = jax.device_put(jnp.full((args.batch,), 0.5, jnp.float32), NamedSharding(mesh, P("data")))
    params = compilation.jit(lambda: unet.init(jax.random.PRNGKey(0), x[:1], g[:1])["params"],
                     out_shardings=NamedSharding(mesh, P()))()
    fwd = compilation.jit(lambda p, x, g: unet.apply({"params": p}, x, g, taps=args.taps))
    compiled = fwd.lower(params, x, g).compile()
    flops = flop_count.unet_forward(config, args.size, args.size, args.batch, taps=args.taps).total
    xla_flops = flop_count.xla_flops(compiled)
    for _ in range(args.warmup):
        jax.block_until_ready(compiled(params, x, g))
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, x, g))
        times.append(time.perf_counter() - t0)
    t = float(np.median(times))
    result = dict(
        device=str(jax.devices()[0].device_kind), n_devices=len(devices), backend=jax.default_backend(),
        jax=jax.__version__, python=platform.python_version(), width=args.width, batch=args.batch,
        size=args.size, dtype=args.dtype, taps=args.taps, median_s=t, ms_per_image=1e3 * t / args.batch,
        images_per_s=args.batch / t, gflop_per_image=flops / args.batch / 1e9, achieved_tflops=flops / t / 1e12,
        flop_count="analytic (dmfuse_jax.flops)", xla_gflop_per_image=xla_flops / args.batch / 1e9,
    )
    print(f"UNet forward ({'taps' if args.taps else 'full'}) width {args.width}, {args.size}x{args.size}, "
          f"batch {args.batch}, {args.dtype} on {len(devices)} x {result['device']}: "
          f"{result['ms_per_image']:.2f} ms/image, {result['images_per_s']:.1f} images/s, "
          f"{result['gflop_per_image']:.1f} GFLOP/image, {result['achieved_tflops']:.3f} TFLOP/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def config_lib_dtypes():
    from dmfuse_jax.models.builders import DTYPES
    return DTYPES


if __name__ == "__main__":
    main()
