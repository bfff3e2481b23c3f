"""Shape-bucket policies on a folder of mixed sizes: compilations, compile and fuse time, and how much
a coarser bucket (a larger reflect-padded canvas) changes the fused images.

  python benchmarks/bucket_policy.py                          # TNO (25 pairs), the bundled default model
  python benchmarks/bucket_policy.py --policies 0,3 --json bucket_policy.json

For each `--max-buckets` policy (0 = one bucket per size rounded to `--bucket`, the old policy) the
folder is fused once in a fresh executable cache; the script prints the compiled shapes, compile
seconds and fuse seconds. Quality: each policy's fused images are compared with the finest policy's
(the first one) as PSNR in dB over [0, 1] (mean and minimum over pairs). The same comparison between
two seeds of the finest policy gives the spread that the diffusion noise alone causes, the scale
against which a policy's change should be read.
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

    def run(max_buckets: int, seed: int = 0, fresh: bool = True):
        if fresh:
            fuser_mod._EXECUTABLES.clear()
        f = fuser_mod.load(args.checkpoint, bucket=args.bucket, max_buckets=max_buckets, seed=seed, dtype=args.dtype)
        t = time.perf_counter()
        out = f.fuse_luma(irs, vis, batch_size=args.batch_size)
        total = time.perf_counter() - t
        return out, dict(max_buckets=max_buckets, seed=seed, compiled=[list(s) for s in f.stats["compiled"]],
                         compilations=len(f.stats["compiled"]), compile_s=f.stats["compile_s"],
                         fuse_s=total - f.stats["compile_s"], total_s=total)

    policies = [int(x) for x in args.policies.split(",")]
    ref, ref_row = run(policies[0])
    rows = [ref_row]
    again, seed_row = run(policies[0], seed=1, fresh=False)  # same executables, other noise
    spread = [psnr(a, b) for a, b in zip(ref, again)]
    seed_row.update(psnr_vs_reference_mean=float(np.mean(spread)), psnr_vs_reference_min=float(np.min(spread)))
    rows.append(seed_row)
    for k in policies[1:]:
        out, row = run(k)
        vals = [psnr(a, b) for a, b in zip(ref, out)]
        row.update(psnr_vs_reference_mean=float(np.mean(vals)), psnr_vs_reference_min=float(np.min(vals)),
                   worst_pair=names[int(np.argmin(vals))])
        rows.append(row)
    print("\n| --max-buckets | seed | compilations | compile s | fuse s | PSNR vs first row (mean / min) |\n"
          "| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        q = (f"{r['psnr_vs_reference_mean']:.1f} / {r['psnr_vs_reference_min']:.1f} dB"
             if "psnr_vs_reference_mean" in r else "reference")
        print(f"| {r['max_buckets']} | {r['seed']} | {r['compilations']} | {r['compile_s']:.1f} | "
              f"{r['fuse_s']:.1f} | {q} |")
    for r in rows:
        print(f"max_buckets {r['max_buckets']} seed {r['seed']}: compiled {r['compiled']}")
    if args.json:
        meta = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), device=jax.devices()[0].device_kind,
                    jax=jax.__version__, pairs=len(pairs), checkpoint=args.checkpoint or "bundled default",
                    bucket=args.bucket, batch_size=args.batch_size)
        write_text_atomic(Path(args.json), json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
