"""`dmfuse report WORKDIR`: one PNG and a markdown summary of a training run (`training/report.py`).

  dmfuse report workdirs/quickstart_fusion            # -> WORKDIR/report.png, WORKDIR/report.md
  dmfuse report workdirs/quickstart_fusion --out reports/qs
"""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("workdir", help="training workdir (with metrics.jsonl)")
    p.add_argument("--out", default=None, help="folder for report.png and report.md (default: the workdir)")


def run(args) -> int:
    from dmfuse_jax.training.report import build_report

    png, md = build_report(args.workdir, args.out)
    print(f"wrote {png} and {md}")
    return 0
