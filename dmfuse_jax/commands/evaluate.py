"""`dmfuse evaluate`: score folders of fused images against their infrared/visible sources.

  dmfuse evaluate --ir DIR --vis DIR --fused DIR [--fused DIR ...] --csv OUT.csv
                  [--markdown OUT.md] [--plot OUT.png [--reference CSV]] [--metrics EN,SD,...]
                  [--convention vifb|standard] [--color luminance|per-channel] [--workers N]

Pairs are matched by file stem (extensions may differ); every fused folder must hold exactly one image
per pair. The method name of a fused folder is the folder's name. Writes one CSV row per (method,
image; the last two columns name the convention and the colour mode), prints the per-method
mean ± std table and the elapsed time, and optionally writes the table as markdown and a radar plot
(OUT.png) with a bar chart beside it (OUT_bars.png).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from dmfuse_jax.errors import UserError
from dmfuse_jax.evaluation.metrics import COLOR_MODES, CONVENTIONS, DEFAULT_CONVENTION, METRICS

# One unit of work: an image pair with the fused images of every method (the sources' expensive
# features are then computed once per pair).
Task = tuple[str, Path, Path, list[tuple[str, Path]]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ir", required=True, help="folder of infrared (or first-modality) images")
    parser.add_argument("--vis", required=True, help="folder of visible (or second-modality) images")
    parser.add_argument("--fused", required=True, action="append",
                        help="folder of fused images (repeat for several methods; method = folder name)")
    parser.add_argument("--csv", required=True, help="per-image scores (CSV: method,image,<metrics>)")
    parser.add_argument("--markdown", help="write the per-method summary table (mean ± std) as markdown")
    parser.add_argument("--plot", help="radar plot PNG (a bar chart is written beside it as *_bars.png); "
                                       "with one method and no --reference, the bar chart instead")
    parser.add_argument("--reference", metavar="CSV",
                        help="a CSV written by dmfuse evaluate with the same convention (for instance the "
                             "classical baselines' scores, benchmarks/baselines_tno.py): its methods join the "
                             "radar plot's per-metric normalisation and are drawn as grey outlines")
    parser.add_argument("--metrics", default=",".join(METRICS),
                        help=f"comma-separated subset of: {','.join(METRICS)} (default: all)")
    parser.add_argument("--convention", choices=tuple(CONVENTIONS), default=DEFAULT_CONVENTION,
                        help="vifb (default): reproduce the VIFB MATLAB toolbox, which most published "
                             "infrared-visible tables come from, so that numbers compare with those tables "
                             "(its PSNR/RMSE helper sqrt(sum((a-b)^2))/(H*W), SSIM and MI summed over the two "
                             "sources, colour scored per R, G, B channel, SF of a colour image on its three "
                             "planes side by side); standard: textbook definitions (true-MSE PSNR/RMSE, SSIM "
                             "averaged over the sources, MI in bits, colour on the BT.601 luminance)")
    parser.add_argument("--color", choices=COLOR_MODES, default=None,
                        help="colour fused images: score the grey luminance, or the mean over R, G, B with "
                             "grey sources reused per channel (VIFB); default: the convention's "
                             "(vifb: per-channel, standard: luminance)")
    parser.add_argument("--workers", type=int, default=0,
                        help="processes (0: one per available CPU, at most one per image pair)")


def _parse_metrics(spec: str) -> list[str]:
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise UserError(f"--metrics: unknown metric(s) {', '.join(unknown) or '(none given)'}; "
                        f"known: {', '.join(METRICS)}")
    return list(dict.fromkeys(names))


def build_tasks(ir_dir: str, vis_dir: str, fused_dirs: list[str]) -> tuple[list[str], list[Task]]:
    """Matches the pairs and the fused images and checks every file's size, before any scoring."""
    from dmfuse_jax.data.images import list_images, match_pairs, probe_image

    pairs = match_pairs(ir_dir, vis_dir)
    methods: list[str] = []
    fused_maps: list[dict[str, Path]] = []
    for d in fused_dirs:
        name = Path(d).resolve().name
        if name in methods:
            raise UserError(f"{d}: two --fused folders are both named {name!r}; the folder name is the "
                            f"method name, so rename one")
        files = list_images(d)
        by_stem: dict[str, Path] = {}
        for p in files:
            if p.stem in by_stem:
                raise UserError(f"{p}: two fused images share the name {p.stem!r} ({by_stem[p.stem].name})")
            by_stem[p.stem] = p
        missing = [stem for stem, _, _ in pairs if stem not in by_stem]
        if missing:
            raise UserError(f"{Path(d) / missing[0]}.*: missing fused image for pair {missing[0]!r} "
                            f"(folder {d} lacks {len(missing)} of {len(pairs)}: {', '.join(missing[:10])}"
                            + (" ..." if len(missing) > 10 else "") + ")")
        extra = sorted(set(by_stem) - {stem for stem, _, _ in pairs})
        if extra:
            raise UserError(f"{by_stem[extra[0]]}: no infrared/visible pair named {extra[0]!r} "
                            f"({len(extra)} unmatched image(s) in {d}: {', '.join(extra[:10])})")
        methods.append(name)
        fused_maps.append(by_stem)
    def wxh(hw: tuple[int, int]) -> str:
        return f"{hw[1]}x{hw[0]}"

    tasks: list[Task] = []
    for stem, ir_path, vis_path in pairs:
        size, vsize = probe_image(ir_path), probe_image(vis_path)
        if vsize != size:
            raise UserError(f"{vis_path}: size {wxh(vsize)} differs from the infrared image {ir_path} ({wxh(size)})")
        fused = []
        for method, by_stem in zip(methods, fused_maps):
            fsize = probe_image(by_stem[stem])
            if fsize != size:
                raise UserError(f"{by_stem[stem]}: size {wxh(fsize)} differs from its "
                                f"source pair {stem!r} ({wxh(size)})")
            fused.append((method, by_stem[stem]))
        tasks.append((stem, ir_path, vis_path, fused))
    return methods, tasks


def score_task(task: Task, metric_names: list[str], color: str, convention: str) -> list[dict]:
    """Scores one pair's fused images (runs in a worker process). Returns one row per method."""
    from dmfuse_jax.data.images import read_image
    from dmfuse_jax.evaluation.metrics import evaluate_images

    stem, ir_path, vis_path, fused = task
    ir, vis = read_image(ir_path), read_image(vis_path)
    rows = []
    for method, path in fused:
        f = read_image(path)
        try:
            scores = evaluate_images(ir, vis, f, metric_names, color=color, convention=convention)
        except ValueError as e:
            raise UserError(f"{path}: {e}") from None
        rows.append({"method": method, "image": stem, **scores})
    return rows


def _score_all(tasks: list[Task], metric_names: list[str], color: str, convention: str,
               workers: int) -> list[dict]:
    if workers <= 1:
        results = [score_task(t, metric_names, color, convention) for t in tasks]
    else:
        # spawn: safe even when the parent has imported JAX (fork after JAX's threads can deadlock).
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(score_task, t, metric_names, color, convention) for t in tasks]
            results = [f.result() for f in futures]
    return [row for rows in results for row in rows]


def _read_reference(path: str, metric_names: list[str], scoring: dict[str, str]):
    """--reference CSV -> its per-method summary; UserError naming the file when it cannot serve."""
    from dmfuse_jax.evaluation import report

    try:
        rows, metrics, ref_scoring = report.read_csv(path)
    except OSError as e:
        raise UserError(f"{path}: cannot read the --reference CSV: {e.strerror or e}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: {e}") from None
    if ref_scoring != scoring:  # numbers under other conventions are not comparable
        def fmt(d):
            return ", ".join(f"{k} {d.get(k, '(not recorded)')}" for k in scoring)
        raise UserError(f"{path}: scored with {fmt(ref_scoring)}; this run uses {fmt(scoring)}; re-score the "
                        f"reference with --convention {scoring['convention']} --color {scoring['color']}")
    missing = [m for m in metric_names if m not in metrics]
    if missing:
        raise UserError(f"{path}: no column for metric(s) {', '.join(missing)}")
    if not rows:
        raise UserError(f"{path}: no scores in the --reference CSV")
    return report.summarize(rows, metric_names)


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the pool's workers), user + system."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _default_workers(n_tasks: int) -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, n_tasks))


def run(args: argparse.Namespace) -> int:
    from dmfuse_jax.evaluation import report

    from dmfuse_jax.data.images import check_output_path

    metric_names = _parse_metrics(args.metrics)
    for flag, path in (("--csv", args.csv), ("--markdown", args.markdown), ("--plot", args.plot)):
        if path:
            check_output_path(path, flag)
    if args.workers < 0:
        raise UserError(f"--workers: must be >= 0, got {args.workers}")
    color = args.color or CONVENTIONS[args.convention].color
    scoring = {"convention": args.convention, "color": color}
    if args.reference and not args.plot:
        raise UserError("--reference: only the radar plot uses it; add --plot OUT.png")
    reference = _read_reference(args.reference, metric_names, scoring) if args.reference else None
    methods, tasks = build_tasks(args.ir, args.vis, args.fused)
    workers = args.workers or _default_workers(len(tasks))
    workers = min(workers, len(tasks))
    start, cpu0 = time.perf_counter(), _cpu_seconds()
    rows = _score_all(tasks, metric_names, color, args.convention, workers)
    elapsed, cpu = time.perf_counter() - start, _cpu_seconds() - cpu0
    order = {m: i for i, m in enumerate(methods)}
    rows.sort(key=lambda r: (order[r["method"]], r["image"]))

    report.write_bytes_atomic(args.csv, report.csv_text(rows, metric_names, scoring).encode())
    summary = report.summarize(rows, metric_names)
    print(report.text_table(summary, metric_names))
    print(f"scored {len(tasks)} pair(s) x {len(methods)} method(s) x {len(metric_names)} metric(s) "
          f"in {elapsed:.1f} s wall, {cpu:.1f} s CPU ({workers} worker(s), convention: {args.convention}, "
          f"colour: {color})")
    print(f"wrote {args.csv}")
    if args.markdown:
        report.write_bytes_atomic(args.markdown, report.markdown_table(summary, metric_names, scoring=scoring).encode())
        print(f"wrote {args.markdown}")
    if args.plot:
        kind = report.radar_plot(summary, metric_names, args.plot, reference=reference)
        bars = report.bars_path(args.plot)
        report.bar_plot(summary, metric_names, bars)
        note = "" if kind == "radar" else " (one method and no --reference: bar chart in place of the radar)"
        print(f"wrote {args.plot} and {bars}{note}")
    sys.stdout.flush()
    return 0
