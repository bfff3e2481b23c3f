"""The README's medical figure: one held-out pair of each Harvard set as MRI | CT/PET/SPECT | the
default model's own (RoadScene) head | the medical head, with the background level (mean fused value
where both sources are black, of 255) and SSIM / Qabf (vifb convention) under each fused image.

  python benchmarks/medical_figure.py [--pairs mri_ct/12,mri_pet/18,mri_spect/13] [--out docs/images/medical_heldout.png]

Reads the fused images that `benchmarks/quality_tno.py --split heldout --methods
dmfuse,dmfuse_roadscene_head,...` wrote to outputs/quality/harvard_<set>_heldout/<method>/ (run that
first); fuses nothing. Only held-out pairs are accepted.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
METHODS = {"dmfuse_roadscene_head": "default head (RoadScene)", "dmfuse": "medical head (--mode medical)"}


def main(argv=None) -> int:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from readme_figure import draw_row

    from dmfuse_jax.data.harvard_split import FOLDERS, HELDOUT
    from dmfuse_jax.data.images import read_image
    from dmfuse_jax.evaluation.background import background_level
    from dmfuse_jax.evaluation.metrics import evaluate_images

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", default="mri_ct/12,mri_pet/18,mri_spect/13", help="SET/NAME,... (held-out pairs)")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--quality", default=str(ROOT / "outputs" / "quality"), help="quality_tno.py's --out")
    p.add_argument("--out", default=str(ROOT / "docs" / "images" / "medical_heldout.png"))
    args = p.parse_args(argv)
    pairs = [tuple(x.split("/")) for x in args.pairs.split(",") if x]
    bad = [f"{s}/{n}" for s, n in pairs if s not in HELDOUT or n not in HELDOUT[s]]
    if bad:
        p.error(f"not held-out pairs: {', '.join(bad)}")
    fig, axes = plt.subplots(len(pairs), 4, figsize=(12, 3.5 * len(pairs)))
    for r, (s, n) in enumerate(pairs):
        a_dir, b_dir = FOLDERS[s]
        a, b = read_image(Path(args.data) / a_dir / f"{n}.png"), read_image(Path(args.data) / b_dir / f"{n}.png")
        panels = [("MRI", a, ""), (b_dir.split("/")[-1], b, "")]
        for method, label in METHODS.items():
            f = read_image(Path(args.quality) / f"harvard_{s}_heldout" / method / f"{n}.png")
            level, _ = background_level(f, a, b)
            sc = evaluate_images(a, b, f, ["SSIM", "Qabf"])
            panels.append((label, f, f"background {255 * level:.1f}/255  SSIM {sc['SSIM']:.3f}  Qabf {sc['Qabf']:.3f}"))
        draw_row(axes[r], panels, f"{s} {n}: ")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
