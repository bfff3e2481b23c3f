"""The README's sample figure: each sample pair (samples/) as infrared | visible | average baseline |
default model, with each fused image's scores (`dmfuse evaluate`'s metrics) under it.

  python benchmarks/readme_figure.py [--out docs/images/samples_fused.png] [--skip-fuse]

Fuses with the same commands as the README (`dmfuse fuse` with the default model, `dmfuse fuse
--method average`) into outputs/readme_figure/{dmfuse,average}/, prints the scores as a markdown table
and writes the figure.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METRICS = ["EN", "SD", "Qabf", "VIF", "MS_SSIM", "SSIM"]
METHODS = {"average": ["--method", "average"], "dmfuse": []}


def draw_row(axes, panels, prefix: str) -> None:
    """One figure row: (title, image (H, W[, 1|3]) in [0, 1], caption) per panel; `prefix` on the first title."""
    for c, (title, img, caption) in enumerate(panels):
        ax = axes[c]
        ax.imshow(img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
        ax.set_title(prefix + title if c == 0 else title, fontsize=10)
        ax.set_xlabel(caption, fontsize=8.5)
        ax.set_xticks([])
        ax.set_yticks([])


def main(argv=None) -> int:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dmfuse_jax.cli import main as dmfuse_main
    from dmfuse_jax.data.images import read_image
    from dmfuse_jax.evaluation.metrics import evaluate_images

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", default=str(ROOT / "samples"))
    p.add_argument("--work", default=str(ROOT / "outputs" / "readme_figure"))
    p.add_argument("--out", default=str(ROOT / "docs" / "images" / "samples_fused.png"))
    p.add_argument("--skip-fuse", action="store_true")
    args = p.parse_args(argv)
    samples, work = Path(args.samples), Path(args.work)
    if not args.skip_fuse:
        for name, src in METHODS.items():
            rc = dmfuse_main(["fuse", *src, "--ir", str(samples / "ir"), "--vis", str(samples / "vi"),
                              "--out", str(work / name), "--no-progress"])
            if rc:
                return rc
    names = sorted(q.stem for q in (samples / "ir").glob("*.png"))
    fig, axes = plt.subplots(len(names), 4, figsize=(12, 3.45 * len(names)))
    rows = ["| pair | method | " + " | ".join(METRICS) + " |", "| --- | --- |" + " ---: |" * len(METRICS)]
    for r, n in enumerate(names):
        ir, vi = read_image(samples / "ir" / f"{n}.png"), read_image(samples / "vi" / f"{n}.png")
        panels = [("infrared", ir, ""), ("visible", vi, "")]
        for method in METHODS:
            f = read_image(work / method / f"{n}.png")
            s = evaluate_images(ir, vi, f, METRICS)
            rows.append(f"| {n} | {method} | " + " | ".join(f"{s[m]:.3f}" for m in METRICS) + " |")
            label = "DMFuse (default model)" if method == "dmfuse" else "average baseline"
            panels.append((label, f, "  ".join(f"{m} {s[m]:.3f}" for m in ("Qabf", "VIF", "MS_SSIM"))
                           + "\n" + "  ".join(f"{m} {s[m]:.2f}" for m in ("EN", "SD", "SSIM"))))
        draw_row(axes[r], panels, f"{n}: ")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print("\n".join(rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
