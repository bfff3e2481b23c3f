"""Fusing memory and speed by image size: peak RSS and seconds per pair, with an A/B against another
checkout (today's code) in the same run.

  python benchmarks/fuse_memory.py --sizes 256x256,576x768 --base /work/wt/base19 --rounds 2
  flock /work/heavy.lock python benchmarks/fuse_memory.py --sizes 1280x1024,2048x2048 --iters 1
  python benchmarks/fuse_memory.py --sizes 6000x6000          # does not fit: the plan's one line, exit 2
  python benchmarks/fuse_memory.py --sizes largest --iters 1  # the largest square the plan says fits

Each (checkout, size) runs in a fresh process (so its peak RSS is its own): it loads the bundled
default model, fuses TNO pair 07 (`../shared/data/tno`, else `samples/`) resized to the size, once to
compile and warm up, then `--iters` more times, and prints JSON: the plan (this checkout: batch,
UNet passes, bytes needed / free), compile s, s/pair (median of the timed runs), peak RSS
(`ru_maxrss`), and the max difference of the fused image from the first checkout's (8-bit steps).
A/B rounds alternate the checkouts (new, base, new, base, ...) so load drifts hit both alike.
`--base DIR` runs the same child with PYTHONPATH=DIR (a checkout without the memory plan runs as it
always did). `largest`: the plan's largest square for this machine (from a 1024x1024 plan).
The load average is printed beside every figure: on a loaded machine only same-run ratios count.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pair(h: int, w: int):
    import numpy as np
    from PIL import Image

    tno = ROOT.parent / "shared" / "data" / "tno"
    src = (tno / "ir" / "07.png", tno / "vi" / "07.png") if tno.is_dir() else \
        (ROOT / "samples" / "ir" / "07.png", ROOT / "samples" / "vi" / "07.png")
    out = []
    for p in src:
        im = Image.open(p).convert("L").resize((w, h), Image.BICUBIC)
        out.append(np.asarray(im, np.float32)[..., None] / 255.0)
    return out


def child(args) -> int:
    """One checkout, one size: JSON on stdout (the last line)."""
    import numpy as np

    import dmfuse_jax
    from dmfuse_jax.errors import UserError

    h, w = map(int, args.size.split("x"))
    ir, vi = _pair(h, w)
    kw = {"passes": args.passes} if args.passes != "auto" else {}
    fuser = dmfuse_jax.load(None, **kw)
    row = dict(size=args.size, root=str(Path(dmfuse_jax.__file__).resolve().parents[1]))
    t = time.perf_counter()
    if hasattr(fuser, "memory_plan"):
        from dmfuse_jax.inference.buckets import bucket_shape

        hb, wb = bucket_shape(h, w, fuser.bucket)
        plan = fuser.memory_plan(1, hb, wb)
        row.update(plan=plan.line(), fits=plan.fits, passes=plan.passes, batch=plan.batch,
                   needed=plan.needed, available=plan.available, largest_square=plan.largest_square)
        if not plan.fits:
            row.update(plan_s=time.perf_counter() - t, peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
            print(json.dumps(row))
            return 2
    try:
        first = fuser.fuse_luma([ir], [vi], batch_size=1)[0]
    except UserError as e:
        row.update(error=str(e))
        print(json.dumps(row))
        return 2
    row["first_s"] = time.perf_counter() - t
    row["compile_s"] = fuser.stats["executables_s"]
    times = []
    for _ in range(args.iters):
        t = time.perf_counter()
        fuser.fuse_luma([ir], [vi], batch_size=1)
        times.append(time.perf_counter() - t)
    # no timed runs: the first fuse less its compilation
    row["s_per_pair"] = statistics.median(times) if times else row["first_s"] - row["compile_s"]
    row["times"] = times
    row["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if args.save:
        np.save(args.save, np.asarray(first, np.float32))
    print(json.dumps(row))
    return 0


def run_child(root: Path, size: str, iters: int, passes: str, save: str | None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(root))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--size", size, "--iters", str(iters),
           "--passes", passes] + (["--save", save] if save else [])
    p = subprocess.run(cmd, env=env, cwd=str(root), capture_output=True, text=True)
    try:
        row = json.loads(p.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        row = dict(size=size, root=str(root), error=(p.stderr.strip().splitlines() or ["no output"])[-1][:300])
    row["rc"] = p.returncode
    row["load"] = os.getloadavg()[0]
    return row


def largest(root: Path) -> str:
    """The plan's largest square (from a 1024x1024 plan of `root`'s checkout)."""
    row = run_child(root, "1024x1024", 0, "sequential", None)
    side = row.get("largest_square")
    if not side:
        raise SystemExit(f"no plan from {root}: {row.get('error')}")
    return f"{side}x{side}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="256x256,576x768", help="HxW list, or 'largest' (default: %(default)s)")
    p.add_argument("--base", default=None, help="another checkout to run the same sizes from (A/B)")
    p.add_argument("--rounds", type=int, default=1, help="A/B rounds, alternating the checkouts")
    p.add_argument("--iters", type=int, default=3, help="timed fuses per process after the first")
    p.add_argument("--passes", default="auto", choices=("auto", "batched", "sequential"),
                   help="this checkout's UNet passes (default: the memory plan chooses)")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", default=None, help=argparse.SUPPRESS)
    p.add_argument("--save", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    roots = [ROOT] + ([Path(args.base).resolve()] if args.base else [])
    sizes = [largest(ROOT) if s == "largest" else s for s in args.sizes.split(",")]
    rows = []
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"fuse_memory_{os.getpid()}"
    tmp.mkdir(exist_ok=True)
    import numpy as np

    for size in sizes:
        for r in range(args.rounds):
            for i, root in enumerate(roots):
                save = str(tmp / f"{size}_{i}.npy")
                row = run_child(root, size, args.iters, args.passes if i == 0 else "auto", save)
                row["checkout"] = "this" if i == 0 else "base"
                if i > 0 and os.path.exists(save) and os.path.exists(tmp / f"{size}_0.npy"):
                    a, b = np.load(tmp / f"{size}_0.npy"), np.load(save)
                    row["max_diff_255"] = float(np.abs(a - b).max() * 255)
                rows.append(row)
                s = row.get("s_per_pair")
                print(f"{size:>10} {row['checkout']:>4} rc {row['rc']} "
                      f"{'%.2f s/pair' % s if s else '-':>12} peak RSS {row.get('peak_rss', 0) / 2**30:5.2f} GiB "
                      f"load {row['load']:.1f} " + (f"passes {row.get('passes')} " if 'passes' in row else "")
                      + (f"diff {row['max_diff_255']:.3f}/255 " if 'max_diff_255' in row else "")
                      + (row.get("plan", "") if row["rc"] == 2 else "") + (row.get("error", "")), flush=True)
    for size in sizes:
        by = {c: [r["s_per_pair"] for r in rows if r["size"] == size and r["checkout"] == c and r.get("s_per_pair")]
              for c in ("this", "base")}
        if by["this"] and by["base"]:
            print(f"{size}: this / base = {statistics.median(by['this']) / statistics.median(by['base']):.3f} "
                  f"(medians of {len(by['this'])} and {len(by['base'])} processes)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
