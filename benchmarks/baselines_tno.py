"""Fuse the TNO pairs with the classical baselines and score them with `dmfuse evaluate`.

  python benchmarks/baselines_tno.py [--data ../shared/data/tno] [--out outputs/baselines_tno]
                                     [--plot docs/images/baselines_tno_radar.png]

Runs `dmfuse fuse --method <baseline>` for each baseline in `dmfuse_jax.evaluation.baselines.BASELINES`
(OUT/<method>/<name>.png), then `dmfuse evaluate` on all of them: OUT/metrics.csv (per image),
OUT/summary.md (means ± std) and the radar / bar plots. Prints the fusion time and the evaluation
time (measured; the evaluation prints its own elapsed time).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    from dmfuse_jax.cli import main as dmfuse_main
    from dmfuse_jax.evaluation.baselines import BASELINES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "tno"),
                   help="folder with ir/ and vi/ subfolders")
    p.add_argument("--out", default=str(ROOT / "outputs" / "baselines_tno"))
    p.add_argument("--plot", default=None, help="radar plot path (default: OUT/radar.png)")
    p.add_argument("--workers", type=int, default=0)
    args = p.parse_args(argv)
    data, out = Path(args.data), Path(args.out)

    t0 = time.perf_counter()
    for name in BASELINES:  # the same command a user runs: dmfuse fuse --method NAME
        rc = dmfuse_main(["fuse", "--method", name, "--ir", str(data / "ir"), "--vis", str(data / "vi"),
                          "--out", str(out / name), "--no-progress"])
        if rc:
            return rc
    print(f"fused with {', '.join(BASELINES)} in {time.perf_counter() - t0:.1f} s")

    plot = args.plot or str(out / "radar.png")
    argv_eval = ["evaluate", "--ir", str(data / "ir"), "--vis", str(data / "vi"),
                 *(x for name in BASELINES for x in ("--fused", str(out / name))),
                 "--csv", str(out / "metrics.csv"), "--markdown", str(out / "summary.md"),
                 "--plot", plot, "--workers", str(args.workers)]
    return dmfuse_main(argv_eval)


if __name__ == "__main__":
    sys.exit(main())
