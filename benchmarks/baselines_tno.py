"""Fuse the TNO pairs with the classical baselines and score them with `dmfuse evaluate`.

  python benchmarks/baselines_tno.py [--data ../shared/data/tno] [--out outputs/baselines_tno]
                                     [--plot docs/images/baselines_tno_radar.png]

Writes OUT/<method>/<name>.png for each baseline in `dmfuse_jax.evaluation.baselines.BASELINES`
(grey 8-bit PNG), then runs the evaluation on all of them: OUT/metrics.csv (per image),
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
    from dmfuse_jax.data.images import match_pairs, read_image, rgb_to_ycbcr, write_image_atomic
    from dmfuse_jax.evaluation.baselines import BASELINES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "tno"),
                   help="folder with ir/ and vi/ subfolders")
    p.add_argument("--out", default=str(ROOT / "outputs" / "baselines_tno"))
    p.add_argument("--plot", default=None, help="radar plot path (default: OUT/radar.png)")
    p.add_argument("--workers", type=int, default=0)
    args = p.parse_args(argv)
    data, out = Path(args.data), Path(args.out)

    def grey(x):  # (H, W, C) in [0, 1] -> (H, W); colour visible images give their luminance
        return rgb_to_ycbcr(x)[..., 0] if x.shape[-1] == 3 else x[..., 0]

    t0 = time.perf_counter()
    pairs = match_pairs(data / "ir", data / "vi")
    for stem, ir_path, vis_path in pairs:
        ir, vis = grey(read_image(ir_path)), grey(read_image(vis_path))
        for name, fn in BASELINES.items():
            write_image_atomic(out / name / f"{stem}.png", fn(ir, vis))
    print(f"fused {len(pairs)} pairs with {', '.join(BASELINES)} in {time.perf_counter() - t0:.1f} s")

    plot = args.plot or str(out / "radar.png")
    argv_eval = ["evaluate", "--ir", str(data / "ir"), "--vis", str(data / "vi"),
                 *(x for name in BASELINES for x in ("--fused", str(out / name))),
                 "--csv", str(out / "metrics.csv"), "--markdown", str(out / "summary.md"),
                 "--plot", plot, "--workers", str(args.workers)]
    return dmfuse_main(argv_eval)


if __name__ == "__main__":
    sys.exit(main())
