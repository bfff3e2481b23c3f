"""Shape-bucket policies on a folder of mixed sizes: compilations, compile and fuse time, and how much
a coarser bucket (a larger reflect-padded canvas) changes the fused images.

  python benchmarks/bucket_policy.py                          # TNO (25 pairs), the bundled default model
  python benchmarks/bucket_policy.py --policies 0,3 --json bucket_policy.json

For each `--max-buckets` policy (0 = one bucket per size rounded to `--bucket`, the old policy) the
whole folder is planned and every bucket compiled in a fresh executable cache (compile seconds, as
`dmfuse fuse` spends them). Then the `--names` pairs (default: all) are fused, each in the bucket
the policy gives it for the whole folder (seconds per pair). Quality: each policy's fused images are
compared with the first policy's as PSNR in dB over [0, 1] (mean and minimum over the pairs). The
same comparison between two seeds of the first policy gives the spread that the diffusion noise
alone causes, the scale against which a policy's change should be read.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ir", default=str(ROOT.parent / "shared" / "data" / "tno" / "ir"))
    p.add_argument("--vis", default=str(ROOT.parent / "shared" / "data" / "tno" / "vi"))
    p.add_argument("--checkpoint", default=None, help="default: the bundled default model")
    p.add_argument("--policies", default="0,3", help="comma list of --max-buckets values; the first is the reference")
    p.add_argument("--bucket", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dtype", default=None)
    p.add_argument("--names", default="", help="comma list of pair file names for the quality comparison "
                                                 "(default: all); compile figures always cover the whole folder")
    p.add_argument("--json")
    args = p.parse_args(argv)

    import jax

    from dmfuse_jax import compilation
    from dmfuse_jax.data.images import read_image, write_text_atomic
    from dmfuse_jax.inference import colour
    from dmfuse_jax.inference import fuser as fuser_mod

    names = sorted(x.name for x in Path(args.ir).iterdir())
    pairs = [colour.prepare_pair(read_image(Path(args.ir) / n), read_image(Path(args.vis) / n), "auto") for n in names]
    irs, vis = [q.ir for q in pairs], [q.vi for q in pairs]
    sizes = sorted({x.shape[:2] for x in irs})
    print(f"{len(pairs)} pairs, {len(sizes)} sizes; device {jax.devices()[0].device_kind}; "
          f"XLA options {compilation.compiler_options()}", flush=True)

    policies = [int(x) for x in args.policies.split(",")]
    chosen = [names.index(n) for n in args.names.split(",")] if args.names else list(range(len(names)))
    rows, outs = [], {}
    for k in policies:
        fuser_mod._EXECUTABLES.clear()  # every policy compiles from scratch
        f = fuser_mod.load(args.checkpoint, bucket=args.bucket, max_buckets=k, dtype=args.dtype)
        plan = f.plan([x.shape[:2] for x in irs], args.batch_size)
        bucket_of = {i: (b, hb, wb) for (b, hb, wb), idx in plan for i in idx}
        for shape in dict.fromkeys(s for s, _ in plan):
            f._executable(*shape)  # compile only, as the first batch of `dmfuse fuse` would
        row = dict(max_buckets=k, compiled=[list(s) for s in f.stats["compiled"]],
                   compilations=len(f.stats["compiled"]), compile_s=f.stats["executables_s"],
                   padded_area=sum(bucket_of[i][1] * bucket_of[i][2] for i in range(len(irs)))
                   / sum(x.shape[0] * x.shape[1] for x in irs))
        for seed in ((0, 1) if k == policies[0] else (0,)):
            f.seed = seed
            t = time.perf_counter()
            outs[k, seed] = [f.dispatch([irs[i]], [vis[i]], batch=bucket_of[i][0], shape=bucket_of[i][1:]).result()[0]
                             for i in chosen]
            if seed == 0:
                row["fuse_s_per_pair"] = (time.perf_counter() - t) / len(chosen)
        rows.append(row)
    ref = outs[policies[0], 0]
    for row in rows:
        other = outs[policies[0], 1] if row is rows[0] else outs[row["max_buckets"], 0]
        vals = [psnr(a, b) for a, b in zip(ref, other)]
        row.update(psnr_mean=float(np.mean(vals)), psnr_min=float(np.min(vals)),
                   psnr_per_pair=dict(zip((names[i] for i in chosen), vals)))
    print(f"\nquality on pairs {[names[i] for i in chosen]}; PSNR against --max-buckets {policies[0]}, seed 0 "
          f"(first row: seed 1 against seed 0, the spread the diffusion noise alone causes)")
    print("| --max-buckets | compilations | compile s | padded area / image area | fuse s/pair | PSNR (mean / min) |\n"
          "| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['max_buckets']} | {r['compilations']} | {r['compile_s']:.1f} | {r['padded_area']:.3f} | "
              f"{r['fuse_s_per_pair']:.2f} | {r['psnr_mean']:.1f} / {r['psnr_min']:.1f} dB |")
    for r in rows:
        print(f"max_buckets {r['max_buckets']}: compiled {r['compiled']}; PSNR per pair "
              + ", ".join(f"{n} {v:.1f}" for n, v in r["psnr_per_pair"].items()))
    if args.json:
        meta = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), device=jax.devices()[0].device_kind,
                    jax=jax.__version__, pairs=len(pairs), checkpoint=args.checkpoint or "bundled default",
                    bucket=args.bucket, batch_size=args.batch_size)
        write_text_atomic(Path(args.json), json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
