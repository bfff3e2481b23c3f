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

DDFM (`--methods ...,ddfm`, its default prior: the default model's UNet, so "DDFM sampling with the
DMFuse UNet as prior") takes minutes per pair on a CPU; `--pairs 07,19` restricts a dataset to some
pairs (inputs linked into OUT/<dataset>_pairs_07-19/inputs/, every method fused and scored on just
those pairs):

  python benchmarks/quality_tno.py --datasets tno --pairs 07,19,20 \
      --methods dmfuse,ddfm,average,max,laplacian_pyramid --markdown docs/quality_ddfm.md

`--split heldout` scores the Harvard sets on their held-out pairs only (dmfuse_jax/data/harvard_split.py:
the medical head of `--mode medical` was trained on the other pairs), in OUT/<dataset>_heldout/; TNO
has no split (never trained on: all 25 pairs). The medical head against the default model's own head,
the classical baselines and the background check (mean fused value where both sources are black):

  python benchmarks/quality_tno.py --split heldout --datasets harvard_mri_ct,harvard_mri_pet,harvard_mri_spect \
      --methods dmfuse,dmfuse_roadscene_head,average,max,laplacian_pyramid \
      --markdown docs/quality_medical.md --plot-dir docs/images

Method `dmfuse` is what `dmfuse fuse` uses with the dataset's mode and no --checkpoint (Harvard:
`--mode medical`, the medical head; TNO: the default bundle), `dmfuse_roadscene_head` the default
bundle with its own (RoadScene-trained) head in every mode (`--checkpoint` the bundle).

Training data and evaluation data never overlap: the default model was trained on RoadScene only
(both stages); TNO was never seen in training, and of Harvard only the train split (by the medical
head), so Harvard tables of the medical head must use `--split heldout`.
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
MODEL = "dmfuse"  # the method name (folder name) of the model's fused images (the mode's default head)
# the default bundle with its own head whatever the mode (for Harvard: the head before issue 23)
ROADSCENE_HEAD = "dmfuse_roadscene_head"
# dataset -> its set in dmfuse_jax/data/harvard_split.py (what --split heldout scores)
SPLIT_SETS = {"harvard_mri_ct": "mri_ct", "harvard_mri_pet": "mri_pet", "harvard_mri_spect": "mri_spect"}
DDFM = "ddfm"  # DDFM sampling with the default prior (`dmfuse fuse --method ddfm`)

# The DMFuse paper's TNO means (DESIGN.md section 7); our metric names (the paper's "MS-SSIM" is the
# field script's multi-exposure variant, our MS_SSIM_MEF, not Wang's MS-SSIM).
PAPER_TNO = {"EN": 6.9324, "SD": 37.0730, "PC": 0.3500, "FMI_pixel": 0.9060, "Qe": 0.4573,
             "Qabf": 0.5467, "MS_SSIM_MEF": 0.9130, "VIF": 0.4233}


def fuse(method: str, ir: Path, vi: Path, mode: str, out: Path, checkpoint: str | None, batch_size: int,
         ddfm_steps: int) -> int:
    from dmfuse_jax.cli import main as dmfuse_main

    if method == ROADSCENE_HEAD:
        from dmfuse_jax.inference.checkpoints import DEFAULT_BUNDLE
        src = ["--checkpoint", str(DEFAULT_BUNDLE)]
    else:
        src = ["--method", method] if method != MODEL else (["--checkpoint", checkpoint] if checkpoint else [])
    if method == DDFM:
        # --bucket 16 (the SR3 prior's stride): the least padding, as the published DDFM figures were run
        src += ["--steps", str(ddfm_steps), "--bucket", "16"]
    argv = ["fuse", *src, "--mode", mode, "--ir", str(ir), "--vis", str(vi),
            "--out", str(out / method), "--batch-size", str(batch_size), "--no-progress"]
    print("dmfuse " + " ".join(argv), flush=True)
    return dmfuse_main(argv)


def score(methods: list[str], ir: Path, vi: Path, out: Path, workers: int) -> int:
    from dmfuse_jax.cli import main as dmfuse_main

    argv = ["evaluate", "--ir", str(ir), "--vis", str(vi),
            *(x for m in methods for x in ("--fused", str(out / m))),
            "--csv", str(out / "metrics.csv"), "--markdown", str(out / "summary.md"), "--plot", str(out / "radar.png"),
            "--workers", str(workers)]
    print("dmfuse " + " ".join(argv), flush=True)
    return dmfuse_main(argv)


def pair_subset(dataset: str, pairs: list[str], out: Path, data: Path, name: str | None = None) -> tuple[str, Path, Path]:
    """Links the chosen pairs' inputs into OUT/<name>/inputs/{a,b} (name: <dataset>_pairs_<a-b-...>
    by default); returns (that folder's name, its a folder, its b folder). Names are file stems."""
    from dmfuse_jax.data.images import is_image_file
    from dmfuse_jax.errors import UserError

    name = name or f"{dataset}_pairs_{'-'.join(pairs)}"
    folders = []
    for side, rel in (("a", DATASETS[dataset][0]), ("b", DATASETS[dataset][1])):
        src = data / rel
        by_stem = {f.stem: f for f in sorted(src.iterdir()) if is_image_file(f)} if src.is_dir() else {}
        missing = [p for p in pairs if p not in by_stem]
        if missing:
            raise UserError(f"{src}: no image for pair(s) {', '.join(missing)}")
        dst = out / name / "inputs" / side
        if dst.exists():
            shutil.rmtree(dst)
        dst.mkdir(parents=True)
        for p in pairs:
            (dst / by_stem[p].name).symlink_to(by_stem[p].resolve())
        folders.append(dst)
    return name, folders[0], folders[1]


def background_table(methods: list[str], ir: Path, vi: Path, out: Path) -> str:
    """Markdown: per method, the mean fused value (in 8-bit levels) over the pixels where both sources
    are at most 2/255, mean and worst over the pairs (dmfuse_jax.evaluation.background)."""
    import numpy as np

    from dmfuse_jax.data.images import match_pairs, read_image
    from dmfuse_jax.evaluation.background import background_level

    pairs = match_pairs(ir, vi)
    sources = {n: (read_image(a), read_image(b)) for n, a, b in pairs}
    lines = ["| method | mean fused where both sources <= 2/255 (of 255), mean over pairs | worst pair | "
             "share of such pixels |", "| --- | ---: | ---: | ---: |"]
    for m in methods:
        levels, shares = [], []
        for n, (a, b) in sources.items():
            level, share = background_level(read_image(out / m / f"{n}.png"), a, b)
            levels.append(255 * level)
            shares.append(share)
        lv = np.array(levels)
        worst = int(np.nanargmax(lv))
        lines.append(f"| {m} | {np.nanmean(lv):.2f} | {lv[worst]:.2f} ({pairs[worst][0]}) | {np.mean(shares):.1%} |")
    return "\n".join(lines) + "\n"


def dataset_table(dataset: str, out: Path) -> str:
    """summary.md of a dataset, with the paper's figures as a last column for TNO (all 25 pairs)."""
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
                   help=f"comma-separated: {MODEL} (the model, the mode's default head), {ROADSCENE_HEAD} "
                        f"(the default bundle's own head), {DDFM} (DDFM, default prior; slow on CPU) "
                        f"and baselines {', '.join(BASELINES)}")
    p.add_argument("--checkpoint", default=None, help="model to score as 'dmfuse' (default: the bundled default model)")
    p.add_argument("--data", default=str(DATA), help="the shared data folder (tno/, harvard/)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="fused images and scores (default: %(default)s)")
    stage = p.add_mutually_exclusive_group()
    stage.add_argument("--skip-fuse", action="store_true", help="score the existing fused folders, fuse nothing")
    stage.add_argument("--fuse-only", action="store_true", help="fuse, score nothing (e.g. methods run apart)")
    p.add_argument("--pairs", default=None,
                   help="comma-separated pair names (file stems): fuse and score only these (e.g. for ddfm)")
    p.add_argument("--split", choices=("all", "heldout"), default="all",
                   help="heldout: Harvard sets on their held-out pairs only (dmfuse_jax/data/harvard_split.py); "
                        "TNO has no split (default: %(default)s)")
    p.add_argument("--ddfm-steps", type=int, default=100, help="DDIM steps for --methods ddfm (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=1, help="model batch size (1 keeps memory low on big TNO pairs)")
    p.add_argument("--workers", type=int, default=0, help="evaluation processes (0: one per CPU)")
    p.add_argument("--markdown", default=None, help="write every dataset's table into this markdown file")
    p.add_argument("--plot-dir", default=None, help="copy each dataset's radar plot here as <dataset>_radar.png")
    args = p.parse_args(argv)

    datasets = [d for d in args.datasets.split(",") if d]
    methods = [m for m in args.methods.split(",") if m]
    pairs = [x for x in args.pairs.split(",") if x] if args.pairs else []
    unknown = [d for d in datasets if d not in DATASETS] + [
        m for m in methods if m not in (MODEL, ROADSCENE_HEAD, DDFM) and m not in BASELINES]
    if unknown:
        p.error(f"unknown dataset(s)/method(s): {', '.join(unknown)}")
    if pairs and args.split != "all":
        p.error("--pairs and --split heldout choose the pairs two ways: give one")
    out, data = Path(args.out), Path(args.data)
    names, backgrounds = [], {}
    for dataset in datasets:
        subset = pairs
        if args.split == "heldout" and dataset in SPLIT_SETS:
            from dmfuse_jax.data.harvard_split import HELDOUT
            subset = list(HELDOUT[SPLIT_SETS[dataset]])
        if subset:
            from dmfuse_jax.errors import UserError
            try:
                name, ir, vi = pair_subset(dataset, subset, out, data,
                                           f"{dataset}_heldout" if subset is not pairs else None)
            except UserError as e:
                print(f"quality_tno.py: error: {e}", file=sys.stderr)
                return 2
        else:
            name, ir, vi = dataset, data / DATASETS[dataset][0], data / DATASETS[dataset][1]
        names.append(name)
        if not args.skip_fuse:
            for method in methods:
                t0, c0 = time.perf_counter(), time.process_time()
                rc = fuse(method, ir, vi, DATASETS[dataset][2], out / name, args.checkpoint, args.batch_size,
                          args.ddfm_steps)
                if rc:
                    return rc
                print(f"{name}/{method}: fused in {time.perf_counter() - t0:.1f} s wall, "
                      f"{time.process_time() - c0:.1f} s CPU", flush=True)
        if not args.fuse_only:
            rc = score(methods, ir, vi, out / name, args.workers)
            if rc:
                return rc
            if dataset in SPLIT_SETS:
                backgrounds[name] = background_table(methods, ir, vi, out / name)
                print(backgrounds[name])
    if args.fuse_only:
        return 0
    if args.markdown:
        from dmfuse_jax.data.images import write_text_atomic
        def pairs_note(n):
            if n.endswith("_heldout"):
                from dmfuse_jax.data.harvard_split import HELDOUT
                return f"Held-out pairs only: {', '.join(HELDOUT[SPLIT_SETS[n.removesuffix('_heldout')]])}.\n\n"
            return ""
        parts = [f"### {n}\n\n{pairs_note(n)}{dataset_table(n, out)}"
                 + (f"\nBackground check:\n\n{backgrounds[n]}" if n in backgrounds else "") for n in names]
        write_text_atomic(args.markdown, "\n".join(parts))
        print(f"wrote {args.markdown}")
    if args.plot_dir:
        Path(args.plot_dir).mkdir(parents=True, exist_ok=True)
        for n in names:
            shutil.copyfile(out / n / "radar.png", Path(args.plot_dir) / f"{n}_radar.png")
        print(f"copied the radar plots to {args.plot_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
