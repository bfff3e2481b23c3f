"""CAIM on TPU: what the criss-cross attention that the dispatcher picks off GPU costs on one v5e chip,
compiled by XLA:TPU (libtpu, no TPU needed). Per size: temps, arguments and bytes accessed of the
attention alone, forward (fusing) and forward + backward (training), with CAIM's shapes: q, k
(1, H, W, 4), v (1, H, W, 32), float32 (the model's default dtype) and bfloat16.

Compares two checkouts in one run: the dmfuse_jax on the default path and, with --other DIR, the
one in DIR (run as a subprocess with PYTHONPATH=DIR; e.g. another branch's criss_cross.py).

  python benchmarks/caim_tpu.py --sizes 576x768,1024x1024
  python benchmarks/caim_tpu.py --sizes 576x768,1024x1024 --other /work/wt/issue19
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def measure(sizes, dtypes, topology="v5e:2x2"):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies

    import dmfuse_jax
    from dmfuse_jax.models import criss_cross

    dev = topologies.get_topology_desc(topology_name=topology, platform="tpu").devices[0]
    sh = jax.sharding.SingleDeviceSharding(dev)
    rows = []
    for (h, w) in sizes:
        for dt in dtypes:
            q = jax.ShapeDtypeStruct((1, h, w, 4), jnp.dtype(dt), sharding=sh)
            v = jax.ShapeDtypeStruct((1, h, w, 32), jnp.dtype(dt), sharding=sh)
            fwd = lambda q, k, v: criss_cross.criss_cross_attention(q, k, v, impl="auto")  # noqa: E731
            train = jax.grad(lambda q, k, v: jnp.sum(fwd(q, k, v).astype(jnp.float32) ** 2), argnums=(0, 1, 2))
            for kind, fn in (("forward", fwd), ("forward+backward", train)):
                t = time.perf_counter()
                try:
                    c = jax.jit(fn).lower(q, q, v).compile()
                except Exception as e:  # noqa: BLE001 - out of memory is a result here
                    rows.append(dict(size=f"{h}x{w}", dtype=dt, kind=kind, error=str(e).splitlines()[0][:200]))
                    continue
                m = c.memory_analysis()
                cost = c.cost_analysis()
                cost = cost[0] if isinstance(cost, (list, tuple)) else cost
                rows.append(dict(size=f"{h}x{w}", dtype=dt, kind=kind, temp_bytes=m.temp_size_in_bytes,
                                 argument_bytes=m.argument_size_in_bytes, output_bytes=m.output_size_in_bytes,
                                 bytes_accessed=cost.get("bytes accessed"), compile_s=time.perf_counter() - t))
    return dict(source=os.path.dirname(os.path.dirname(dmfuse_jax.__file__)), rows=rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="576x768,1024x1024")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--other", help="another checkout's root: measured the same way, in a subprocess")
    p.add_argument("--json", help="write both results here")
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    dtypes = args.dtypes.split(",")
    if args._child:
        print(json.dumps(measure(sizes, dtypes)))
        return 0
    results = [measure(sizes, dtypes)]
    if args.other:
        env = {**os.environ, "PYTHONPATH": args.other}
        out = subprocess.run([sys.executable, __file__, "--_child", "--sizes", args.sizes, "--dtypes", args.dtypes],
                             env=env, capture_output=True, text=True, check=True, cwd=args.other)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("| checkout | size | dtype | pass | temps MiB | bytes accessed MB | compile s |")
    print("|---|---|---|---|---|---|---|")
    for res in results:
        for r in res["rows"]:
            if "error" in r:
                print(f"| {res['source']} | {r['size']} | {r['dtype']} | {r['kind']} | {r['error']} | | |")
            else:
                print(f"| {res['source']} | {r['size']} | {r['dtype']} | {r['kind']} | {r['temp_bytes'] / 2 ** 20:,.1f} "
                      f"| {r['bytes_accessed'] / 1e6:,.1f} | {r['compile_s']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
