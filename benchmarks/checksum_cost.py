"""What the content checksums cost, in seconds per GB, each against a reference pass over the same
bytes measured in the same run:

  checkpoint hash on device (`training.checkpoint.array_hashes`, jitted)  vs  jnp.sum of the arrays
  checkpoint hash on the host (`host_hashes`, numpy; load_params)         vs  np.sum of the arrays
  sha256 (bundle manifest, export params)                                  vs  a copy of the bytes (np.copy)
  the default bundle: load_bundle (restore + sha256 check) vs its sha256 check alone

  python benchmarks/checksum_cost.py [--mb 256] [--repeats 3]
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None) -> int:
    import jax
    import jax.numpy as jnp

    from dmfuse_jax.inference import bundle as bundle_lib
    from dmfuse_jax.inference.checkpoints import DEFAULT_BUNDLE
    from dmfuse_jax import workdir as ck

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=256, help="MB of float32 params (16 arrays)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    n = args.mb * 2**20 // 4 // 16
    rng = np.random.default_rng(0)
    host = {f"a{i:02d}": rng.standard_normal(n, dtype=np.float32).reshape(-1, 256) for i in range(16)}
    gb = sum(a.nbytes for a in host.values()) / 1e9
    dev = jax.device_put(host)
    sums = jax.jit(lambda t: [jnp.sum(x) for x in jax.tree_util.tree_leaves(t)])
    jax.block_until_ready(ck.array_hashes(dev))  # compile both once
    jax.block_until_ready(sums(dev))
    rows = [
        ("checkpoint hash, device", best(lambda: jax.block_until_ready(ck.array_hashes(dev)), args.repeats),
         "jnp.sum", best(lambda: jax.block_until_ready(sums(dev)), args.repeats)),
        ("checkpoint hash, host (numpy)", best(lambda: ck.host_hashes(host), args.repeats),
         "np.sum", best(lambda: [np.sum(a) for a in host.values()], args.repeats)),
        ("sha256 (bundle, export)", best(lambda: bundle_lib.manifest(host), args.repeats),
         "np.copy", best(lambda: [np.copy(a) for a in host.values()], args.repeats)),
    ]
    print(f"{gb:.3f} GB of float32 in 16 arrays on {jax.devices()[0].platform}; best of {args.repeats}")
    print(f"{'check':32s} {'s/GB':>7s}   reference  {'s/GB':>7s}   ratio")
    for name, t, ref_name, t_ref in rows:
        print(f"{name:32s} {t / gb:7.3f}   {ref_name:10s} {t_ref / gb:7.3f}   {t / t_ref:5.1f}x")

    meta = bundle_lib.read_meta(DEFAULT_BUNDLE)
    t_load = best(lambda: bundle_lib.load_bundle(DEFAULT_BUNDLE), 1)
    _, params, _ = bundle_lib.load_bundle(DEFAULT_BUNDLE)
    stored = jax.tree_util.tree_map(lambda a: np.asarray(a, meta["param_dtype"]), params)
    t_check = best(lambda: bundle_lib.verify_manifest(stored, meta["arrays"], "default"), args.repeats)
    mb = sum(a.nbytes for a in jax.tree_util.tree_leaves(stored)) / 2**20
    print(f"default bundle ({mb:.1f} MiB stored): load_bundle {t_load:.2f} s, of which the sha256 check "
          f"{t_check:.3f} s ({100 * t_check / t_load:.1f}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
