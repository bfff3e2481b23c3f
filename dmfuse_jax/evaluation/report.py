"""Evaluation outputs: per-image CSV, per-method summary (mean, std), markdown table, radar and bar
plots. Every file is written atomically (temporary file in the same folder, then os.replace)."""
from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

import numpy as np

from dmfuse_jax.data.images import write_bytes_atomic
from dmfuse_jax.evaluation.metrics import LOWER_IS_BETTER

# Columns `csv_text` appends after the metrics: how the numbers were computed.
SCORING_KEYS = ("convention", "color")

# rows: dicts with keys "method", "image" and one float per metric.
Row = dict
Summary = dict  # method -> metric -> (mean, std)


def csv_text(rows: list[Row], metrics: list[str], scoring: dict[str, str] | None = None) -> str:
    """Columns method, image, the metrics, then one column per `scoring` item (e.g. convention and
    colour mode, the same on every row, so that a CSV says how its numbers were computed)."""
    scoring = scoring or {}
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", "image", *metrics, *scoring])
    for r in rows:
        w.writerow([r["method"], r["image"], *(repr(float(r[m])) for m in metrics), *scoring.values()])
    return buf.getvalue()


def summarize(rows: list[Row], metrics: list[str]) -> Summary:
    """Per method (in first-seen order), the mean and population std of each metric over its images.
    Non-finite values (a PSNR of +inf for identical images) are left out of that metric's statistics."""
    methods: dict[str, list[Row]] = {}
    for r in rows:
        methods.setdefault(r["method"], []).append(r)
    out: Summary = {}
    for method, rs in methods.items():
        out[method] = {}
        for m in metrics:
            v = np.array([r[m] for r in rs], np.float64)
            v = v[np.isfinite(v)]
            out[method][m] = (float(v.mean()), float(v.std())) if v.size else (math.nan, math.nan)
    return out


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    a = abs(x)
    return f"{x:.1f}" if a >= 1000 else f"{x:.2f}" if a >= 100 else f"{x:.4f}"


def markdown_table(summary: Summary, metrics: list[str], *, with_std: bool = True,
                   scoring: dict[str, str] | None = None) -> str:
    """Metrics as rows, methods as columns, cells 'mean ± std'; the best mean per row in bold; a line
    under the table names the `scoring` items (convention, colour mode) when given."""
    methods = list(summary)
    lines = ["| metric | " + " | ".join(methods) + " |", "| --- |" + " ---: |" * len(methods)]
    for m in metrics:
        means = [summary[k][m][0] for k in methods]
        finite = [v for v in means if math.isfinite(v)]
        best = (min(finite) if m in LOWER_IS_BETTER else max(finite)) if finite and len(methods) > 1 else None
        cells = []
        for k in methods:
            mean, std = summary[k][m]
            cell = _fmt(mean) + (f" ± {_fmt(std)}" if with_std else "")
            cells.append(f"**{cell}**" if best is not None and mean == best else cell)
        arrow = "↓" if m in LOWER_IS_BETTER else "↑"
        lines.append(f"| {m} {arrow} | " + " | ".join(cells) + " |")
    if scoring:
        lines += ["", "Scored with " + ", ".join(f"{k}: {v}" for k, v in scoring.items()) + "."]
    return "\n".join(lines) + "\n"


def text_table(summary: Summary, metrics: list[str]) -> str:
    methods = list(summary)
    width = max(18, *(len(k) + 2 for k in methods))
    out = [f"{'metric':<10}" + "".join(f"{k:>{width}}" for k in methods)]
    for m in metrics:
        cells = "".join(f"{_fmt(summary[k][m][0]) + ' ± ' + _fmt(summary[k][m][1]):>{width}}" for k in methods)
        out.append(f"{m:<10}" + cells)
    return "\n".join(out)


def read_csv(path: str | os.PathLike) -> tuple[list[Row], list[str], dict[str, str]]:
    """A CSV written by `csv_text` -> (rows, metric names, scoring items such as the convention).
    ValueError naming the problem for a file that is not such a CSV."""
    with open(path, newline="") as fh:
        table = list(csv.reader(fh))
    if not table or table[0][:2] != ["method", "image"]:
        raise ValueError("not a CSV written by dmfuse evaluate (its header must start with method,image)")
    header = table[0]
    scoring_keys = [k for k in header[2:] if k in SCORING_KEYS]
    metrics = [k for k in header[2:] if k not in SCORING_KEYS]
    rows, scoring = [], {}
    for line_no, line in enumerate(table[1:], start=2):
        if len(line) != len(header):
            raise ValueError(f"line {line_no} has {len(line)} fields, the header {len(header)}")
        rec = dict(zip(header, line))
        try:
            rows.append({"method": rec["method"], "image": rec["image"], **{m: float(rec[m]) for m in metrics}})
        except ValueError as e:
            raise ValueError(f"line {line_no}: {e}") from None
        scoring = {k: rec[k] for k in scoring_keys}
    return rows, metrics, scoring



def normalized_scores(summary: Summary, metrics: list[str],
                      reference: Summary | None = None) -> dict[str, np.ndarray]:
    """Per metric, the means min-max scaled to [0.1, 1] over the methods of `summary` and `reference`
    together, with 1 the best (lower-is-better metrics flipped), as in radar plots of fusion papers;
    equal means all score 1. Returns the scores of every method of both (summary's first)."""
    merged = {**(reference or {}), **summary}
    methods = list(summary) + [k for k in merged if k not in summary]
    table = np.array([[merged[k][m][0] for m in metrics] for k in methods], np.float64)
    scores = np.ones_like(table)
    for j, m in enumerate(metrics):
        col = table[:, j]
        ok = np.isfinite(col)
        if not ok.any():
            continue
        lo, hi = col[ok].min(), col[ok].max()
        if hi > lo:
            t = (col - lo) / (hi - lo)
            if m in LOWER_IS_BETTER:
                t = 1.0 - t
            scores[:, j] = np.where(ok, 0.1 + 0.9 * t, 0.1)
    return {k: scores[i] for i, k in enumerate(methods)}


def _save_figure_atomic(fig, path: str | os.PathLike) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    write_bytes_atomic(path, buf.getvalue())


def radar_plot(summary: Summary, metrics: list[str], path: str | os.PathLike, title: str = "",
               reference: Summary | None = None) -> str:
    """Radar chart of the per-metric normalised scores (outer = better), the `reference` methods (for
    instance the classical baselines' summary) drawn as grey broken outlines and included in the
    normalisation. Min-max scaling needs two methods to compare: with a single method and no
    reference every metric would sit on the outer ring, so the bar chart is written instead.
    Returns what was written: 'radar' or 'bars'."""
    reference = {k: v for k, v in (reference or {}).items() if k not in summary}
    if len(summary) + len(reference) < 2:
        bar_plot(summary, metrics, path)
        return "bars"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = normalized_scores(summary, metrics, reference)
    angles = np.linspace(0, 2 * np.pi, len(metrics), endpoint=False)
    closed = np.append(angles, angles[0])
    fig = plt.figure(figsize=(7.5, 7.5))
    ax = fig.add_subplot(111, projection="polar")
    ref_styles = [(ls, grey) for grey in ("0.35", "0.6") for ls in ("--", ":", "-.")]
    for method, s in scores.items():
        vals = np.append(s, s[0])
        if method in reference:
            ls, grey = ref_styles[list(reference).index(method) % len(ref_styles)]
            ax.plot(closed, vals, linewidth=1.2, linestyle=ls, color=grey, label=f"{method} (reference)")
        else:
            ax.plot(closed, vals, linewidth=1.8, label=method)
            ax.fill(closed, vals, alpha=0.12)
    ax.set_xticks(angles)
    ax.set_xticklabels([m + (" ↓" if m in LOWER_IS_BETTER else "") for m in metrics], fontsize=9)
    ax.set_ylim(0, 1.05)
    ax.set_yticks([0.25, 0.5, 0.75, 1.0])
    ax.set_yticklabels([])
    ax.legend(loc="upper right", bbox_to_anchor=(1.25, 1.1), fontsize=9)
    ax.set_title(title or "per-metric normalised means (outer = better; ↓: lower is better, flipped)",
                 fontsize=10, pad=24)
    _save_figure_atomic(fig, path)
    plt.close(fig)
    return "radar"


def bar_plot(summary: Summary, metrics: list[str], path: str | os.PathLike) -> None:
    """One panel per metric: bar per method = mean, error bar = std over images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(summary)
    ncol = min(5, len(metrics))
    nrow = math.ceil(len(metrics) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.0 * ncol, 2.6 * nrow), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    x = np.arange(len(methods))
    for i, m in enumerate(metrics):
        ax = axes[i // ncol][i % ncol]
        means = [summary[k][m][0] for k in methods]
        stds = [summary[k][m][1] for k in methods]
        ax.bar(x, means, yerr=stds, capsize=3, color=[colors[j % len(colors)] for j in range(len(methods))])
        ax.set_title(m + (" (lower is better)" if m in LOWER_IS_BETTER else ""), fontsize=9)
        ax.set_xticks(x)
        ax.set_xticklabels(methods, rotation=30, ha="right", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
    for j in range(len(metrics), nrow * ncol):
        axes[j // ncol][j % ncol].axis("off")
    fig.tight_layout()
    _save_figure_atomic(fig, path)
    plt.close(fig)


def bars_path(plot_path: str | os.PathLike) -> Path:
    """`out.png` -> `out_bars.png` (the bar chart written beside the radar plot)."""
    p = Path(plot_path)
    return p.with_name(p.stem + "_bars" + (p.suffix or ".png"))
