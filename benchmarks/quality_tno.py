"""Held-out quality: fuse TNO (infrared/visible) and the Harvard medical pairs with the default model
and the classical baselines, then score every folder with `dmfuse evaluate` (all 20 metrics).

  python benchmarks/quality_tno.py                                   # fuse + score all datasets
  python benchmarks/quality_tno.py --skip-fuse                       # re-score existing fused folders
  python benchmarks/quality_tno.py --datasets tno --methods dmfuse,average --markdown docs/quality.md

Fused images go to OUT/<dataset>/<method>/<name>.png (default OUT: outputs/quality), through the
same commands a user runs: `dmfuse fuse` (default model, or --checkpoint) and `dmfuse fuse --method NAME`; medical pairs with `--mode medical`. Then per
dataset `dmfuse evaluate` writes OUT/<dataset>/metrics.csv, summary.md and radar.png (+ _bars.png).
`--skip-fuse` only scores (e.g. after a change of metric conventions), `--fuse-only` only fuses.
`--markdown` writes one file with every dataset's table (TNO's with the paper's DMFuse figures in a
last column), `--plot-dir` copies the radar plots (<dataset>_radar.png).

Training data and evaluation data never overlap: the default model was trained on RoadScene only
(both stages); TNO and Harvard were never seen in training.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DEFAULT_OUT = ROOT / "outputs" / "quality"

# dataset -> (infrared / first-modality folder, visible / second-modality folder, fuse mode)
DATASETS: dict[str, tuple[str, str, str]] = {
    "tno": ("tno/ir", "tno/vi", "auto"),
    "harvard_mri_ct": ("harvard/MRI_CT/MRI", "harvard/MRI_CT/CT", "medical"),
    "harvard_mri_pet": ("harvard/MRI_PET/MRI", "harvard/MRI_PET/PET", "medical"),
    "harvard_mri_spect": ("harvard/MRI_SPECT/MRI", "harvard/MRI_SPECT/SPECT", "medical"),
}
MODEL = "dmfuse"  # the method name (folder name) of the model's fused images

# The DMFuse paper's TNO means (DESIGN.md section 7); our metric names.
PAPER_TNO = {"EN": 6.9324, "SD": 37.0730, "PC": 0.3500, "FMI_pixel": 0.9060, "Qe": 0.4573,
             "Qabf": 0.5467, "MS_SSIM": 0.9130, "VIF": 0.4233}


def fuse(dataset: str, method: str, out: Path, data: Path, checkpoint: str | None, batch_size: int) -> int:
    from dmfuse_jax.cli import main as dmfuse_main

    ir, vi, mode = DATASETS[dataset]
    src = ["--method", method] if method != MODEL else (["--checkpoint", checkpoint] if checkpoint else [])
    argv = ["fuse", *src, "--mode", mode, "--ir", str(data / ir), "--vis", str(data / vi),
            "--out", str(out / dataset / method), "--batch-size", str(batch_size), "--no-progress"]
    print("dmfuse " + " ".join(argv), flush=True)
    return dmfuse_main(argv)


def score(dataset: str, methods: list[str], out: Path, data: Path, workers: int) -> int:
    from dmfuse_jax.cli import main as dmfuse_main

    ir, vi, _ = DATASETS[dataset]
    d = out / dataset
    argv = ["evaluate", "--ir", str(data / ir), "--vis", str(data / vi),
            *(x for m in methods for x in ("--fused", str(d / m))),
            "--csv", str(d / "metrics.csv"), "--markdown", str(d / "summary.md"), "--plot", str(d / "radar.png"),
            "--workers", str(workers)]
    print("dmfuse " + " ".join(argv), flush=True)
    return dmfuse_main(argv)


def dataset_table(dataset: str, out: Path) -> str:
    """summary.md of a dataset, with the paper's figures as a last column for TNO."""
    text = (out / dataset / "summary.md").read_text()
    if dataset != "tno":
        return text
    lines = text.rstrip("\n").split("\n")
    lines[0] += " paper (DMFuse, TNO) |"
    lines[1] += " ---: |"
    for i in range(2, len(lines)):
        if not lines[i].startswith("|"):  # the "Scored with convention ..." line after the table
            continue
        name = lines[i].split("|")[1].strip().split(" ")[0]
        lines[i] += f" {PAPER_TNO[name]:.4f} |" if name in PAPER_TNO else " - |"
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from dmfuse_jax.evaluation.baselines import BASELINES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated of: {', '.join(DATASETS)}")
    p.add_argument("--methods", default=",".join([MODEL, *BASELINES]),
                   help=f"comma-separated: {MODEL} (the model) and baselines {', '.join(BASELINES)}")
    p.add_argument("--checkpoint", default=None, help="model to score as 'dmfuse' (default: the bundled default model)")
    p.add_argument("--data", default=str(DATA), help="the shared data folder (tno/, harvard/)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="fused images and scores (default: %(default)s)")
    stage = p.add_mutually_exclusive_group()
    stage.add_argument("--skip-fuse", action="store_true", help="score the existing fused folders, fuse nothing")
    stage.add_argument("--fuse-only", action="store_true", help="fuse, score nothing (e.g. methods run apart)")
    p.add_argument("--batch-size", type=int, default=1, help="model batch size (1 keeps memory low on big TNO pairs)")
    p.add_argument("--workers", type=int, default=0, help="evaluation processes (0: one per CPU)")
    p.add_argument("--markdown", default=None, help="write every dataset's table into this markdown file")
    p.add_argument("--plot-dir", default=None, help="copy each dataset's radar plot here as <dataset>_radar.png")
    args = p.parse_args(argv)

    datasets = [d for d in args.datasets.split(",") if d]
    methods = [m for m in args.methods.split(",") if m]
    unknown = [d for d in datasets if d not in DATASETS] + [m for m in methods if m != MODEL and m not in BASELINES]
    if unknown:
        p.error(f"unknown dataset(s)/method(s): {', '.join(unknown)}")
    out, data = Path(args.out), Path(args.data)
    for dataset in datasets:
        if not args.skip_fuse:
            for method in methods:
                t0 = time.perf_counter()
                rc = fuse(dataset, method, out, data, args.checkpoint, args.batch_size)
                if rc:
                    return rc
                print(f"{dataset}/{method}: fused in {time.perf_counter() - t0:.1f} s wall", flush=True)
        if not args.fuse_only:
            rc = score(dataset, methods, out, data, args.workers)
            if rc:
                return rc
    if args.fuse_only:
        return 0
    if args.markdown:
        from dmfuse_jax.data.images import write_text_atomic
        parts = [f"### {d}\n\n{dataset_table(d, out)}" for d in datasets]
        write_text_atomic(args.markdown, "\n".join(parts))
        print(f"wrote {args.markdown}")
    if args.plot_dir:
        Path(args.plot_dir).mkdir(parents=True, exist_ok=True)
        for d in datasets:
            shutil.copyfile(out / d / "radar.png", Path(args.plot_dir) / f"{d}_radar.png")
        print(f"copied the radar plots to {args.plot_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
