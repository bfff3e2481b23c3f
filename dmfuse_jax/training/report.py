"""A training run's report (`dmfuse report WORKDIR`, `commands/report.py`): one PNG and a markdown summary.

  dmfuse report workdirs/quickstart_fusion            # -> WORKDIR/report.png, WORKDIR/report.md
  dmfuse report workdirs/quickstart_fusion --out reports/qs

The PNG (matplotlib) has the training loss, learning rate and gradient norm, every eval curve of
`metrics.jsonl` (`eval/NAME/VARIANT/METRIC`: one panel per NAME and METRIC, a line per params variant;
a diffusion_loss's per-timestep losses in one panel per variant), the best checkpoint's step marked
on every panel (`best/`, see `training/best.py`), and the last preview grid the run wrote
(`evals/*/step_*.png`, `samples/step_*.png` or `previews/step_*.png`). The markdown gives the last
and best value of every eval and where the best checkpoint is. Both are written atomically.
"""
from __future__ import annotations

import io
import json
import math
import re
from collections import OrderedDict
from pathlib import Path

from dmfuse_jax.errors import UserError

TRAIN_KEYS = (("train/loss", "training loss"), ("train/learning_rate", "learning rate"),
              ("train/grad_norm", "gradient norm"))
PREVIEW_GLOBS = ("evals/*/step_*.png", "samples/step_*.png", "previews/step_*.png")


def read_metrics(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path}: missing: {workdir} is not a training workdir with logs (no metrics.jsonl)")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if i == len(path.read_text().splitlines()):  # a last line torn by a crash
                break
            raise UserError(f"{path}:{i}: not a JSON line") from None
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    if not rows:
        raise UserError(f"{path}: no logged steps yet")
    return rows


def series(rows: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """tag -> (steps, values), the last value per step (a resumed run logs some steps again)."""
    per: dict[str, dict[int, float]] = {}
    for r in rows:
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                per.setdefault(k, {})[int(r["step"])] = float(v)
    return {k: (sorted(d), [d[s] for s in sorted(d)]) for k, d in per.items()}


_EVAL = re.compile(r"^eval/(?P<name>[^/]+)/(?P<variant>[^/]+)/(?P<metric>.+)$")


def eval_panels(tags) -> "OrderedDict[str, list[tuple[str, str]]]":
    """Panel title -> [(tag, line label)]: one panel per (eval, metric), a line per variant; the
    per-timestep losses of a diffusion_loss eval share a panel per variant."""
    panels: OrderedDict[str, list[tuple[str, str]]] = OrderedDict()
    for tag in sorted(tags):
        m = _EVAL.match(tag)
        if not m:
            continue
        name, variant, metric = m["name"], m["variant"], m["metric"]
        if metric.startswith("loss_t"):
            panels.setdefault(f"{name}: loss per timestep ({variant})", []).append((tag, f"t={int(metric[6:])}"))
        else:
            panels.setdefault(f"{name}: {metric}", []).append((tag, variant))
    return panels


def last_preview(workdir: Path) -> Path | None:
    found = [p for g in PREVIEW_GLOBS for p in workdir.glob(g)]
    if not found:
        return None
    step = lambda p: int(re.search(r"step_(\d+)", p.name).group(1)) if re.search(r"step_(\d+)", p.name) else -1  # noqa: E731
    return max(found, key=lambda p: (step(p), str(p)))


def build_report(workdir, out=None) -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from dmfuse_jax.data.images import read_image, write_bytes_atomic, write_text_atomic
    from dmfuse_jax.workdir import best_info

    workdir = Path(workdir)
    if not workdir.is_dir():
        raise UserError(f"{workdir}: no such training workdir")
    out = Path(out) if out is not None else workdir
    from dmfuse_jax.data.images import check_output_path
    check_output_path(out, "--out", folder=True)
    rows = read_metrics(workdir)
    s = series(rows)
    try:
        best = best_info(workdir)
    except Exception as e:  # noqa: BLE001 - the report still shows the curves
        best = None
        print(f"{workdir / 'best'}: unreadable best checkpoint ({type(e).__name__}: {e}); not marked")
    panels = [(title, [(k, "")]) for k, title in TRAIN_KEYS if k in s]
    panels += list(eval_panels(s).items())
    preview = last_preview(workdir)
    n = len(panels) + (preview is not None)
    cols = 3
    nrows = max(1, -(-n // cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.4 * nrows), squeeze=False)
    flat = list(axes.ravel())
    for ax, (title, lines) in zip(flat, panels):
        for tag, label in lines:
            xs, ys = s[tag]
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, label=label or None)
            if best is not None and tag == best["metric"]:
                ax.plot([best["step"]], [best["value"]], marker="*", ms=14, color="crimson", zorder=5,
                        label=f"best: step {best['step']}")
        if best is not None:
            ax.axvline(best["step"], color="crimson", ls="--", lw=0.8)
        ys = s["train/loss"][1] if "train/loss" in s else []
        if title == "training loss" and ys and min(ys) > 0 and max(ys) > 10 * min(ys):  # a 10x fall: log scale
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if any(label for _, label in lines) or (best is not None and any(t == best["metric"] for t, _ in lines)):
            ax.legend(fontsize=7)
    used = len(panels)
    if preview is not None:
        ax = flat[used]
        img = np.clip(read_image(preview), 0, 1)
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"last preview: {preview.relative_to(workdir)}", fontsize=9)
        ax.axis("off")
        used += 1
    for ax in flat[used:]:
        ax.axis("off")
    last_step = max(int(r["step"]) for r in rows)
    title = f"{workdir.name}: {last_step} steps"
    if best is not None:
        title += f"; best {best['metric']} = {best['value']:.4g} at step {best['step']}"
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    png = out / "report.png"
    write_bytes_atomic(png, buf.getvalue())
    md = out / "report.md"
    write_text_atomic(md, markdown(workdir, s, best, last_step, preview, png, md))
    return png, md


def markdown(workdir: Path, s, best, last_step: int, preview, png: Path, md: Path) -> str:
    import os

    lines = [f"# Training report: {workdir}", "", f"![report]({os.path.relpath(png, md.parent)})", "",
             f"Last logged step: {last_step}.", ""]
    tr = [(title, s[k]) for k, title in TRAIN_KEYS if k in s]
    if tr:
        lines += ["| training | first | last |", "| --- | --- | --- |"]
        lines += [f"| {t} | {v[1][0]:.4g} (step {v[0][0]}) | {v[1][-1]:.4g} (step {v[0][-1]}) |" for t, v in tr]
        lines.append("")
    evals = sorted(k for k in s if k.startswith("eval/"))
    if evals:
        lines += ["| eval | last | best (min or max as the metric's direction) |", "| --- | --- | --- |"]
        from dmfuse_jax.evaluation.metrics import LOWER_IS_BETTER
        for k in evals:
            steps, vals = s[k]
            metric = k.rsplit("/", 1)[-1]
            lower = metric in LOWER_IS_BETTER or metric.startswith("loss")
            i = int(min(range(len(vals)), key=lambda j: vals[j] if lower else -vals[j]))
            lines.append(f"| `{k}` | {vals[-1]:.4g} (step {steps[-1]}) | {vals[i]:.4g} (step {steps[i]}) |")
        lines.append("")
    if best is not None:
        try:
            stage = json.loads((workdir / "config.json").read_text()).get("stage")
        except (OSError, ValueError):
            stage = None
        use = (f"`dmfuse fuse --checkpoint {workdir} --step best ...`" if stage == "fusion" else
               "`dmfuse_jax.workdir.load_best_params(workdir, ema=True)`")
        lines += [f"Best checkpoint: step {best['step']}, `{best['metric']}` = {best['value']:.6g} ({best['mode']}), "
                  f"in `{workdir / 'best'}`; use it with {use}.", ""]
    else:
        lines += ["No best checkpoint (config.checkpoint.best.metric was empty).", ""]
    if preview is not None:
        lines += [f"Last preview grid: `{preview}`.", ""]
    return "\n".join(lines)
