"""Per metric, the largest relative difference between `dmfuse evaluate --convention vifb` and the
independent formulations in tests/metrics_reference.py (loop-for-loop transcriptions of VIFB's MATLAB
and of the MATLAB the field uses for the other metrics), on the hand-made grey and colour images the
tests use. Prints a markdown table.

  python benchmarks/metrics_vs_reference.py
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    sys.path.insert(0, str(ROOT / "tests"))
    import metrics_reference as R

    worst = R.largest_relative_differences()
    print("| metric | largest relative difference (vifb) |\n| --- | ---: |")
    for name, v in worst.items():
        print(f"| {name} | {v:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
