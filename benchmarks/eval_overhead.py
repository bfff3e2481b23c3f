"""What evaluation while training costs: the quickstart fusion run (configs/quickstart_fusion.py) with
its `evals.holdout` (fusion_metrics: the 2 held-out RoadScene pairs, full size, Qabf/VIF/SSIM/MS_SSIM_MEF)
every `--every` steps, against the same run without evals, in the same session.

  python benchmarks/eval_overhead.py --unet-workdir workdirs/quickstart_pretrain --steps 100 --every 25

Prints, per run: wall time of `dmfuse train` (process start to exit), the evals' own measured time and
share of the training loop (what the run prints at its end: "evals: ... (X%)"), and the A/B wall
difference as a cross-check. Both runs start from fresh workdirs under --root (default: a temporary
folder) and use no persistent compilation cache, so each pays its compilations.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(workdir: Path, args, evals: bool) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "dmfuse_jax", "train", "--config", str(REPO / "configs" / "quickstart_fusion.py"),
           "--workdir", str(workdir), "--compilation-cache", "off",
           f"--config.init.unet_workdir={args.unet_workdir}", f"--config.total_steps={args.steps}",
           f"--config.checkpoint_every_steps={args.steps}", f"--config.log_every_steps={args.every}"]
    if evals:
        cmd += [f"--config.evals.holdout.every_steps={args.every}"]
    else:
        cmd += ["--config.evals.holdout.every_steps=0", "--config.checkpoint.best.metric="]
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO))
    wall = time.perf_counter() - t
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return wall, proc.stdout


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--unet-workdir", required=True, help="a quickstart stage-1 workdir (configs/quickstart_pretrain.py)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--every", type=int, default=25)
    p.add_argument("--root", default=None, help="folder for the two workdirs (default: a temporary one)")
    args = p.parse_args()
    root = Path(args.root or tempfile.mkdtemp(prefix="eval_overhead_"))
    load = os.getloadavg()
    plain_wall, _ = run(root / "plain", args, evals=False)
    evals_wall, out = run(root / "evals", args, evals=True)
    m = re.search(r"evals: (\d+) run\(s\), ([\d.]+) s of ([\d.]+) s of training \(([\d.]+)%; ([\d.]+) s compiling\)", out)
    if not m:
        sys.exit(f"no 'evals:' line in the run's output:\n{out[-2000:]}")
    runs, ev_s, loop_s, share, comp_s = m.groups()
    print(f"quickstart fusion, {args.steps} steps, fusion_metrics on 2 full-size held-out pairs every {args.every} "
          f"steps ({runs} evals); load average at start {load[0]:.2f}")
    print(f"  without evals: {plain_wall:.1f} s wall")
    print(f"  with evals:    {evals_wall:.1f} s wall; evals {ev_s} s of the {loop_s} s training loop = {share}% "
          f"({comp_s} s of it compiling the fuse buckets once)")
    print(f"  A/B wall difference: {evals_wall - plain_wall:+.1f} s ({100 * (evals_wall - plain_wall) / evals_wall:+.1f}% "
          "of the run with evals)")
    print(f"  load average at end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
