"""`report.png` in a run folder: the curves of its `metrics.jsonl` on one page.

Panels, each drawn when the metrics hold it:

- loss: training loss and validation loss (`eval_loss`) by step;
- learning rate by step;
- throughput: training tokens per second by step;
- compute: validation and training loss against the cumulative training FLOPs (`train_flops`).

Drawn with matplotlib's Agg canvas directly (no pyplot, so no global backend is switched), at a
fixed size: 1200 pixels wide, 350 pixels per row of two panels. `toolkit report RUN_DIR` redraws it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from toolkit.engine.tracking import read_metrics
from toolkit.errors import ToolkitError

REPORT_FILE = "report.png"
WIDTH_IN, ROW_IN, DPI = 12.0, 3.5, 100


def _series(rows: list[dict], y: str, x: str = "step") -> tuple[list[float], list[float]]:
    """(x, y) of the rows holding both as finite numbers (non-finite values are logged as strings)."""
    points = [
        (r[x], r[y])
        for r in rows
        if isinstance(r.get(x), (int, float)) and isinstance(r.get(y), (int, float)) and math.isfinite(r[y])
    ]
    return [p[0] for p in points], [p[1] for p in points]


TRAIN, EVAL = ("training", "-", "C0"), ("validation", "o-", "C1")  # legend label, line style, colour


def _panels(rows: list[dict]) -> list[tuple[str, str, str, list[tuple[str, tuple[str, str, str]]]]]:
    """(title, x label, x key, [(y key, (legend label, style, colour))]) of every panel that has data."""
    candidates = [
        ("loss", "step", "step", [("loss", TRAIN), ("eval_loss", EVAL)]),
        ("learning rate", "step", "step", [("learning_rate", TRAIN)]),
        ("throughput (training tokens / s)", "step", "step", [("tokens_per_second", TRAIN)]),
        ("loss against compute", "training FLOPs", "train_flops", [("loss", TRAIN), ("eval_loss", EVAL)]),
    ]
    out = []
    for title, xlabel, x, lines in candidates:
        present = [line for line in lines if _series(rows, line[0], x)[0]]
        if present:
            out.append((title, xlabel, x, present))
    return out


def write_report(run_dir: str | Path) -> Path:
    """Draw `RUN_DIR/report.png` from `RUN_DIR/metrics.jsonl` and return its path. A folder without
    metrics (no `metrics.jsonl`, or one with no rows to draw) raises ToolkitError."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    panels = _panels(rows)
    if not panels:
        state = "holds no rows" if (run_dir / "metrics.jsonl").is_file() else "does not exist"
        raise ToolkitError(
            f"nothing to draw for '{run_dir}': {run_dir / 'metrics.jsonl'} {state} with loss, learning rate or "
            "throughput; give the output_dir of a run that trained at least one logged step"
        )
    n_rows = math.ceil(len(panels) / 2)
    fig = Figure(figsize=(WIDTH_IN, ROW_IN * n_rows), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, 2, squeeze=False).ravel()
    for ax, (title, xlabel, x, lines) in zip(axes, panels):
        for y, (label, style, colour) in lines:
            xs, ys = _series(rows, y, x)
            ax.plot(xs, ys, style, label=label, color=colour, markersize=4)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend()
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    last = max((r["step"] for r in rows if isinstance(r.get("step"), int)), default=0)
    fig.suptitle(f"{run_dir.resolve().name}: {last} steps")
    fig.tight_layout()
    path = run_dir / REPORT_FILE
    tmp = run_dir / f".tmp-{REPORT_FILE}"
    fig.savefig(tmp, dpi=DPI, format="png")
    os.replace(tmp, path)  # a reader never sees a half-written image
    return path
