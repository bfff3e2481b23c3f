"""The README's main job, timed as a user runs it: `dmfuse fuse --ir samples/ir --vis samples/vi
--out OUT` with the bundled default model, in a fresh process (imports, model load, compile, fuse).

  python benchmarks/main_job.py [--repeat 1] [--xla-flags "--xla_backend_optimization_level=0"]

Prints the command's own summary (compile time, fusing time, ms per pair, model load) and, measured
from outside: wall time, CPU time (user + system) and peak resident memory of the process, plus the
machine's load average before and after (the figures are only comparable at similar load).
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--xla-flags", default=None, help="XLA_FLAGS for the run (default: inherit)")
    p.add_argument("--extra", default="", help="extra arguments for dmfuse fuse (e.g. '--batch-size 1')")
    args = p.parse_args(argv)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if args.xla_flags is not None:
        env["XLA_FLAGS"] = args.xla_flags
    for i in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "dmfuse_jax", "fuse", "--ir", str(ROOT / "samples" / "ir"),
                   "--vis", str(ROOT / "samples" / "vi"), "--out", str(Path(tmp) / "fused"), "--no-progress",
                   *args.extra.split()]
            load0 = os.getloadavg()
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            if res.returncode:
                print(res.stdout + res.stderr)
                return res.returncode
            summary = [line for line in res.stdout.splitlines() if line.startswith("fused ")]
            cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            print(f"run {i + 1}: XLA_FLAGS={env.get('XLA_FLAGS', '')!r}")
            print("  " + (summary[-1] if summary else res.stdout.strip().splitlines()[-1]))
            print(f"  wall {wall:.1f} s, CPU {cpu:.1f} s, peak RSS {after.ru_maxrss / 2**20:.2f} GiB "
                  f"(largest child so far), load average {load0[0]:.1f} before, {os.getloadavg()[0]:.1f} after")
    return 0


if __name__ == "__main__":
    sys.exit(main())
