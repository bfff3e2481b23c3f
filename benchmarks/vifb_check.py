"""Score VIFB's own fused images with `--convention vifb` and compare with the per-image values the VIFB
toolbox's MATLAB wrote (output/evaluation_metrics_single/<image>_<method>_<Metric>.txt).

  python benchmarks/vifb_check.py --vifb PATH/TO/VIFB [--methods GFF,CBF,ADF,MSVD,DLF] [--workers N]

PATH/TO/VIFB is a checkout of github.com/xingchenzhang/VIFB (input/VI, input/IR, output/fused_images,
output/evaluation_metrics_single). The text files hold 4-5 significant digits (dlmwrite), so a value
"agrees" when ours rounds to it: |ours - theirs| <= half a unit of its last printed digit. Prints, per
metric, the number of (image, method) values compared, how many agree, and the largest relative
difference.
"""
from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from decimal import Decimal
from multiprocessing import get_context
from pathlib import Path

# VIFB's file names -> our CSV names
VIFB_NAMES = {"Avg_gradient": "AG", "Cross_entropy": "CE", "Edge_intensity": "EI", "Entropy": "EN",
              "Mutinf": "MI", "Psnr": "PSNR", "Qabf": "Qabf", "Qcb": "Qcb", "Qcv": "Qcv", "Rmse": "RMSE",
              "Spatial_frequency": "SF", "Ssim": "SSIM", "Variance": "SD"}


def _score(args):
    root, image, method = args
    from dmfuse_jax.data.images import read_image
    from dmfuse_jax.evaluation.metrics import evaluate_images

    vis = read_image(root / "input" / "VI" / f"{image}.jpg")
    ir = read_image(root / "input" / "IR" / f"{image}.jpg")
    fused = read_image(root / "output" / "fused_images" / f"{image}_{method}.jpg")
    return image, method, evaluate_images(ir, vis, fused, list(VIFB_NAMES.values()), convention="vifb")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vifb", required=True, help="VIFB checkout")
    p.add_argument("--methods", default="GFF,CBF,ADF,MSVD,DLF")
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args(argv)
    root = Path(args.vifb)
    single = root / "output" / "evaluation_metrics_single"
    images = sorted(f.stem for f in (root / "input" / "VI").glob("*.jpg"))
    jobs = [(root, im, m) for im in images for m in args.methods.split(",")
            if (root / "output" / "fused_images" / f"{im}_{m}.jpg").exists()]
    if not jobs:
        print(f"no fused images found under {root}", file=sys.stderr)
        return 2
    with ProcessPoolExecutor(max_workers=max(1, args.workers), mp_context=get_context("spawn")) as pool:
        results = list(pool.map(_score, jobs))
    stats = {ours: [0, 0, 0.0, ""] for ours in VIFB_NAMES.values()}  # n, agree, worst rel, worst case
    for image, method, scores in results:
        for vifb_name, ours in VIFB_NAMES.items():
            path = single / f"{image}_{method}_{vifb_name}.txt"
            if not path.exists():
                continue
            text = path.read_text().strip()
            theirs = Decimal(text)
            half_ulp = Decimal(5) * Decimal(10) ** (theirs.as_tuple().exponent - 1)
            got = scores[ours]
            s = stats[ours]
            s[0] += 1
            s[1] += abs(Decimal(repr(got)) - theirs) <= half_ulp
            rel = abs(got - float(theirs)) / abs(float(theirs)) if float(theirs) else abs(got)
            if rel >= s[2]:
                s[2], s[3] = rel, f"{image}/{method}: ours {got:.6g}, VIFB {text}"
    print("| metric | values | agree to VIFB's printed digits | largest relative difference | worst case |")
    print("| --- | ---: | ---: | ---: | --- |")
    for name, (n, agree, worst, case) in stats.items():
        print(f"| {name} | {n} | {agree} | {worst:.1e} | {case} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
