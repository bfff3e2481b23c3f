"""The "Will it fit?" table: `dmfuse compile` for the paper-size configs on several TPU slices, built in
parts. Each cell is one compile, written to OUT/<cell>.json by the command itself; a cell whose JSON
exists is not compiled again, so the script resumes where it stopped. It prints what it has, marking
each figure measured (a compile of that cell), predicted (the per-chip affine memory line of two
compiles on the same chip and mesh kind), or not done.

  python benchmarks/fit_table.py --run coco_v5e8_b64            # one cell (under the heavy lock)
  python benchmarks/fit_table.py --run all                      # every missing cell, in priority order
  python benchmarks/fit_table.py --run 'largest:v5e dp'         # bisect the largest per-chip batch that compiles
  python benchmarks/fit_table.py --run 'at:v4 dp:96'            # the line's program at 96 images per chip
  python benchmarks/fit_table.py --run fuse:1056                 # fuse one 1056x1056 pair on one v5e chip
  python benchmarks/fit_table.py                                # print the table from what exists

A paper-size compile costs ~22 min and ~10 GB resident on 2 cores: each cell runs as
`flock LOCK dmfuse compile ...` (--lock, default /work/heavy.lock when it exists), one at a time.
The affine line: per-chip peak memory m(b) = a + k b for the per-chip batch b, from two compiles;
the largest batch that fits is floor((HBM - a) / k) rounded down to a multiple the mesh allows, and
a third compile ("check" cells) tests it. When the check fails (the line does not hold: XLA:TPU
changes its fusion and rematerialisation with the batch), 'largest:LINE' bisects between the largest
per-chip batch that compiled and the smallest that did not, one compile per step, until the gap is
at most --resolution images per chip; the table then says "measured: fits A, not B".
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "fit_cells"
STAGE1_STEPS = 500_000
COCO, TNO = "configs/coco_pretrain.py", "configs/tno_fusion.py"
BF16 = ("--config.model.dtype=bfloat16",)


@dataclass(frozen=True)
class Cell:
    name: str
    config: str
    topology: str
    batch: int = 0  # global batch (train) or pairs (fuse)
    fsdp: int = 1
    num_slices: int = 1
    what: str = "train"
    size: str = ""
    line: str = ""  # cells with the same line share one affine memory fit (same chip, same mesh kind)
    extra: tuple = field(default=BF16)

    def command(self, out: Path) -> list[str]:
        cmd = [sys.executable, "-m", "dmfuse_jax.cli", "compile", "--config", self.config, "--topology", self.topology,
               "--what", self.what, "--json", str(out / f"{self.name}.json")]
        if self.num_slices > 1:
            cmd += ["--num-slices", str(self.num_slices)]
        if self.what == "train":
            cmd += [f"--config.batch_size={self.batch}", f"--config.sharding.mesh_shape=(-1, {self.fsdp})"]
        else:
            cmd += ["--size", self.size, "--batch", str(self.batch)]
        return cmd + list(self.extra)


# Priority order: the Must-show cell first, then the second point of its memory line, then the rest.
CELLS: list[Cell] = [
    Cell("coco_v5e8_b64", COCO, "v5e:2x4", 64, line="v5e dp"),
    Cell("coco_v5e8_b32", COCO, "v5e:2x4", 32, line="v5e dp"),
    Cell("fuse_v5e_576x768", "configs/dmfuse_quarter.py", "v5e:2x2", 1, what="fuse", size="576x768"),
    Cell("coco_v5e16_fsdp4", COCO, "v5e:4x4", 128, fsdp=4, line="v5e fsdp4"),
    Cell("coco_2x_v5e8", COCO, "v5e:2x4", 128, num_slices=2, line="v5e dp"),
    Cell("coco_v5e16_fsdp1", COCO, "v5e:4x4", 128, line="v5e dp"),
    Cell("coco_v5p8", COCO, "v5p:2x2x1", 32, line="v5p dp"),
    Cell("coco_v4_8", COCO, "v4:2x2x1", 32, line="v4 dp"),
    Cell("coco_v6e8", COCO, "v6e:2x4", 64, line="v6e dp"),
    Cell("tno_v5e8", TNO, "v5e:2x4", 32, line="tno v5e dp"),
    Cell("fuse_v5e_1024", "configs/dmfuse_quarter.py", "v5e:2x2", 1, what="fuse", size="1024x1024"),
]


def load(out: Path) -> dict[str, dict]:
    got = {}
    for cell in CELLS:
        p = out / f"{cell.name}.json"
        if p.is_file():
            got[cell.name] = json.loads(p.read_text())
    for p in sorted(out.glob("*.json")):  # check cells and extra cells written by --run NAME:BATCH
        if p.stem not in got:
            got[p.stem] = json.loads(p.read_text())
    return got


def lines(cells: list[Cell], got: dict[str, dict]) -> dict[str, tuple[float, float, str]]:
    """line -> (a, k, source): peak bytes per chip = a + k * per-chip batch, from the two measured
    results of that line with the most different per-chip batches (its cells, and any other compile
    of its first cell's program: bisection, 'at:' and check compiles)."""
    fits = {}
    for line in {c.line for c in cells if c.line}:
        base = next(c for c in cells if c.line == line)
        named = {c.name for c in cells if c.line == line}
        pts = sorted({(r["per_chip_batch"], r["memory"]["peak_bytes"], n) for n, r in got.items()
                      if "memory" in r and (n in named or _same_program(base, r))})
        if len(pts) < 2 or pts[0][0] == pts[-1][0]:
            continue
        (b0, m0, n0), (b1, m1, n1) = pts[0], pts[-1]
        k = (m1 - m0) / (b1 - b0)
        fits[line] = (m0 - k * b0, k, f"{n0} + {n1}")
    return fits


def largest_batch(fit, hbm: float) -> int:
    a, k, _ = fit
    return max(0, math.floor((hbm - a) / k)) if k > 0 else 0


def _gib(x):
    return f"{x / 2 ** 30:.2f}"


def largest_text(c: Cell, got: dict, fit) -> str:
    """The largest-batch column of cell c: the bisection's bracket where a compile failed above one
    that fitted (measured, for c's own program); for a cell elsewhere on the line, its base cell's
    bracket by name, with c's own largest compile that fitted when it reaches the bracket (a check
    that the same per-chip program fits there too); else the affine line's prediction."""
    lo, hi, base = bracket(c.line, got) if c.line else (None, None, None)
    if lo is not None and hi is not None:
        own_lo, own_hi = program_bracket(c, got)
        if own_lo is not None and own_hi is not None:
            return f"measured: fits {own_lo:g}, not {own_hi:g}"
        if own_lo is not None and own_lo >= lo:
            return f"fits {own_lo:g} (own compile); {base.name}: fits {lo:g}, not {hi:g}"
        return f"{base.name}: fits {lo:g}, not {hi:g}"
    return f"predicted {largest_batch(fit, _hbm(base))}" if fit and base is not None else ""


def table(out: Path) -> str:
    got = load(out)
    fits = lines(CELLS, got)
    rows = ["| cell | config | topology | chips | mesh | batch (per chip) | peak GiB/chip (HBM) | largest per-chip batch "
            "| collectives | roofline step | images/s bound | stage-1 chip-hours (500k steps) | compile |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in CELLS:
        r = got.get(c.name)
        fit = fits.get(c.line)
        topo = f"{c.topology}{' x%d' % c.num_slices if c.num_slices > 1 else ''}"
        if r is None:
            if fit and c.what == "train":
                # a cell on another cell's line: same chip and mesh kind, not compiled itself
                largest = largest_text(c, got, fit)
                rows.append(f"| {c.name} | {Path(c.config).stem} | {topo} "
                            f"| | fsdp {c.fsdp} | {c.batch} | predicted {_gib(fit[0] + fit[1] * _per_chip_guess(c))} "
                            f"| {largest} | not done | not done | not done | not done | not done |")
                continue
            rows.append(f"| {c.name} | {Path(c.config).stem} | {topo} | | fsdp {c.fsdp} | {c.batch or ''} | not done | | | | | | |")
            continue
        if "does_not_fit" in r:
            rows.append(_does_not_fit_row(c.name, r))
            continue
        rows.append(_measured_row(c, r, largest_text(c, got, fit)))
    for n in (n for n in got if n not in {c.name for c in CELLS}):  # check and bisection cells
        r = got[n]
        if "does_not_fit" in r:
            rows.append(_does_not_fit_row(n, r))
        elif "memory" in r:
            rows.append(_measured_row(Cell(n, r["config"], r["topology"], line=""), r, ""))
    notes = [f"- line `{k}`: peak = {_gib(a)} GiB + {_gib(kk)} GiB x per-chip batch (from {src})"
             for k, (a, kk, src) in sorted(fits.items())]
    return "\n".join(rows + [""] + notes)


def _does_not_fit_row(name: str, r: dict) -> str:
    if r.get("what") == "fuse":  # one chip, whatever the slice
        chips, batch = 1, f"{r['batch']} pair {r.get('size', '')}"
    else:
        chips = _chips(r["topology"], r.get("num_slices", 1))
        batch = f"{r['batch']} ({r['batch'] / chips:g})" if r.get("batch") else ""
    why = r["does_not_fit"].split("error: ", 1)[-1].split("; largest buffers", 1)[0]
    why = "needs " + why.split(" needs ", 1)[1] if " needs " in why else why
    mesh = "1 chip" if r.get("what") == "fuse" else f"fsdp {r.get('fsdp', 1)}"
    return (f"| {name} | {Path(r['config']).stem} | {r['topology']} | {chips} | {mesh} | {batch} "
            f"| measured: does not fit ({why}) | | | | | | |")


def _hbm(c) -> float:
    """The chip's HBM from dmfuse_jax.accelerators (today's figure, not the one a cell's JSON was
    written with)."""
    from dmfuse_jax.accelerators import CHIPS

    return CHIPS[c.topology.split(":")[0]].hbm_bytes


def _per_chip_guess(c: Cell) -> float:
    return c.batch / _chips(c.topology, c.num_slices)


def _measured_row(c: Cell, r: dict, largest: str) -> str:
    m, rf, chip = r.get("memory", {}), r.get("roofline", {}), {**r["chip"], "hbm_bytes": _hbm(c)}
    topo = r["topology"] + (f" x{r['num_slices']}" if r.get("num_slices", 1) > 1 else "")
    coll = ", ".join(f"{k} x{v['count']} ({v['bytes'] / 2 ** 20:,.0f} MiB)" for k, v in r.get("collectives", {}).items()) or "none"
    if r["what"] == "train":
        mesh = f"{r['mesh']['data']}x{r['mesh']['fsdp']}"
        batch = f"{r['global_batch']} ({r['per_chip_batch']:g})"
        largest = largest or "(one point)"
        hours = STAGE1_STEPS * rf["step_s"] * r["chips"] / 3600 if r.get("stage") == "pretrain" else None
        hours = f"{hours:,.0f} (bound)" if hours is not None else "n/a (stage 2)"
    else:
        mesh, batch, largest, hours = "1 chip", f"{r['batch']} pair {r['size'][0]}x{r['size'][1]}", "", "n/a"
    return (f"| {c.name} | {Path(r['config']).stem} | {topo} | {r['chips']} | {mesh} | {batch} "
            f"| measured {_gib(m.get('peak_bytes', float('nan')))} ({_gib(chip['hbm_bytes'])}) | {largest} | {coll} "
            f"| {rf.get('step_s', float('nan')) * 1e3:.1f} ms ({rf.get('bound', '')}) | {rf.get('images_per_s', float('nan')):,.0f} "
            f"| {hours} | {r['compile']['wall_s']:.0f} s wall / {r['compile']['cpu_s']:.0f} s CPU |")


def run_cell(cell: Cell, out: Path, lock: str | None) -> int:
    out.mkdir(parents=True, exist_ok=True)
    cmd = cell.command(out)
    if lock:
        cmd = ["flock", lock, "/usr/bin/time", "-v"] + cmd
    print("$", " ".join(cmd), flush=True)
    with open(out / f"{cell.name}.log", "w") as log:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    print(f"{cell.name}: exit {rc}; log {out / (cell.name + '.log')}", flush=True)
    if rc == 2:  # does not fit (or bad input): the one line is the result of this cell
        line = next((l for l in (out / f"{cell.name}.log").read_text().splitlines()
                     if l.startswith("dmfuse compile: error:")), "exit 2")
        (out / f"{cell.name}.json").write_text(json.dumps(dict(
            does_not_fit=line, config=cell.config, topology=cell.topology, batch=cell.batch, fsdp=cell.fsdp,
            num_slices=cell.num_slices, what=cell.what, size=cell.size)))
    return rc


def _chips(topology: str, num_slices: int = 1) -> int:
    return math.prod(int(x) for x in topology.split(":")[1].split("x")) * num_slices


def _same_program(cell: Cell, r: dict) -> bool:
    """Whether result r compiled cell's program up to the batch (config, topology, slices, fsdp)."""
    fsdp = r["mesh"]["fsdp"] if "mesh" in r else r.get("fsdp", 1)
    return (r.get("config") == cell.config and r.get("topology") == cell.topology
            and r.get("num_slices", 1) == cell.num_slices and fsdp == cell.fsdp and r.get("what", "train") == "train")


def _at(base: Cell, per_chip: int, line: str, tag: str = "") -> Cell:
    """base's program at per_chip images per chip, named <base without its _bN>_<tag>b<global>."""
    chips = _chips(base.topology, base.num_slices)
    return Cell(f"{base.name.rsplit('_b', 1)[0]}_{tag}b{per_chip * chips}", base.config, base.topology,
                per_chip * chips, fsdp=base.fsdp, num_slices=base.num_slices, line=line)


def program_bracket(cell: Cell, got: dict) -> tuple[float | None, float | None]:
    """(largest per-chip batch that compiled, smallest above it that did not) over every result of
    cell's program (config, topology, slices, fsdp), whatever its name."""
    chips = _chips(cell.topology, cell.num_slices)
    fits, fails = [], []
    for r in got.values():
        if not _same_program(cell, r):
            continue
        if "does_not_fit" in r:
            fails.append(r["batch"] / chips)
        elif "memory" in r:
            fits.append(r["per_chip_batch"])
    lo = max(fits, default=None)
    hi = min((b for b in fails if lo is None or b > lo), default=None)
    return lo, hi


def bracket(line: str, got: dict) -> tuple[int | None, int | None, Cell | None]:
    """`program_bracket` of the line's first cell, and that cell."""
    base = next((c for c in CELLS if c.line == line), None)
    if base is None:
        return None, None, None
    return (*program_bracket(base, got), base)


def largest_cell(name: str, got: dict, resolution: int) -> Cell | None:
    """'largest:LINE' -> the next bisection compile, or None when the bracket is closed (or cannot start)."""
    line = name.split(":", 1)[1]
    lo, hi, base = bracket(line, got)
    if base is None or lo is None or hi is None:
        print(f"{name}: needs a compile that fits and one that does not (have: fits {lo}, not {hi})", file=sys.stderr)
        return None
    if hi - lo <= resolution:
        print(f"{name}: fits {lo:g} per chip, not {hi:g} (resolution {resolution})")
        return None
    return _at(base, int((lo + hi) // 2), line)


def at_cell(name: str) -> Cell | None:
    """'at:LINE:N' -> the program of the line's first cell at N images per chip (a probe: one side of a
    bracket); 'at:CELL:N' -> that cell's program; 'fuse:S' -> the fuse function for one SxS pair on
    one v5e chip."""
    kind, _, rest = name.partition(":")
    if kind == "fuse":
        size = int(rest)
        return Cell(f"fuse_v5e_{size}", "configs/dmfuse_quarter.py", "v5e:2x2", 1, what="fuse", size=f"{size}x{size}")
    line, _, n = rest.rpartition(":")
    base = next((c for c in CELLS if c.name == line), None) or next((c for c in CELLS if c.line == line), None)
    if base is None or not n.isdigit():
        print(f"{name}: want at:LINE:IMAGES_PER_CHIP or at:CELL:IMAGES_PER_CHIP with a known line or cell", file=sys.stderr)
        return None
    return _at(base, int(n), line)


def check_cell(name: str, got: dict) -> Cell | None:
    """'check:LINE' -> a compile at the predicted largest per-chip batch of that line."""
    line = name.split(":", 1)[1]
    fit = lines(CELLS, got).get(line)
    base = next((c for c in CELLS if c.line == line and c.name in got), None)
    if fit is None or base is None:
        print(f"{name}: line {line!r} has fewer than two measured points", file=sys.stderr)
        return None
    return _at(base, largest_batch(fit, _hbm(base)), line, tag="check_")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--run", help="comma list of cell names, 'check:LINE' (compile the predicted largest batch), "
                                 "'largest:LINE' (bisect the largest batch that compiles), 'at:LINE:N' (N images "
                                 "per chip), 'fuse:S' (one SxS pair), or 'all'")
    p.add_argument("--resolution", type=int, default=8,
                   help="largest:LINE stops when fits and does-not-fit are this many images per chip apart (default: %(default)s)")
    p.add_argument("--max-compiles", type=int, default=4, help="largest:LINE: at most this many compiles per run")
    p.add_argument("--lock", default="/work/heavy.lock" if os.path.exists("/work/heavy.lock") else None)
    args = p.parse_args(argv)
    if args.run:
        names = [c.name for c in CELLS] if args.run == "all" else args.run.split(",")
        for name in names:
            got = load(args.out)
            if name.startswith("largest:"):
                for _ in range(args.max_compiles):
                    cell = largest_cell(name, load(args.out), args.resolution)
                    if cell is None or run_cell(cell, args.out, args.lock) not in (0, 2):
                        break
                continue
            if name.startswith("check:"):
                cell = check_cell(name, got)
            elif name.startswith(("at:", "fuse:")):
                cell = at_cell(name)
            else:
                cell = next((c for c in CELLS if c.name == name), None)
                if cell is None:
                    print(f"unknown cell {name}; cells: {', '.join(c.name for c in CELLS)}", file=sys.stderr)
                    return 2
            if cell is None or cell.name in got:
                continue
            run_cell(cell, args.out, args.lock)
    print(table(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
