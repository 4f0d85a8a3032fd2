"""Metrics to `metrics.jsonl` in the output folder and to Accelerate's trackers (TensorBoard,
MLflow, Weights & Biases, ...: `training.report_to`)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from toolkit.errors import ToolkitError, check_choice

# accelerate's tracker names (accelerate.tracking.LOGGER_TYPE_TO_CLASS) -> the pip package each needs
TRACKERS = {
    "tensorboard": "tensorboard",
    "mlflow": "mlflow",
    "wandb": "wandb",
    "comet_ml": "comet-ml",
    "aim": "aim",
    "clearml": "clearml",
    "dvclive": "dvclive",
    "swanlab": "swanlab",
    "trackio": "trackio",
}


def check_trackers(names: list) -> None:
    """Refuse an unknown tracker name, and a known one whose package is not installed (accelerate
    would otherwise drop it with a warning, or fail at the first log line)."""
    import accelerate.utils

    for name in names:
        check_choice("training.report_to", name, tuple(TRACKERS))
        if not getattr(accelerate.utils, f"is_{name}_available")():
            raise ToolkitError(
                f"training.report_to lists '{name}', but its package is not installed: pip install {TRACKERS[name]} "
                "(or remove it from training.report_to)"
            )


class MetricsLog:
    def __init__(self, output_dir: str | Path, accelerator, resume_step: int | None):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.accelerator = accelerator
        if accelerator.is_main_process:
            if resume_step is None:
                self.path.unlink(missing_ok=True)
            elif self.path.is_file():  # drop what a crashed run logged after its last checkpoint
                kept = [json.dumps(m) for m in read_metrics(output_dir) if m["step"] <= resume_step]
                self.path.write_text("".join(ln + "\n" for ln in kept))

    def log(self, step: int, values: dict) -> None:
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in values.items()}
        self.accelerator.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=step)
        if self.accelerator.is_main_process:
            with self.path.open("a") as fh:
                fh.write(json.dumps({"step": step, **clean}) + "\n")


def read_metrics(output_dir: str | Path) -> list[dict]:
    """The logged lines. A torn last line (a crash in mid-write) is skipped with a warning; a bad line
    elsewhere is an error that names it."""
    from toolkit.errors import ToolkitError

    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()
    rows = []
    for i, ln in enumerate(lines, 1):
        if not ln.strip():
            continue
        try:
            row = json.loads(ln)
            if not isinstance(row, dict) or "step" not in row:
                raise ValueError("not a metrics line")
        except ValueError:
            if i == len(lines):
                print(f"note: {path}: skipped a torn last line ({ln[:40]!r}), written during a crash", file=sys.stderr)
                continue
            raise ToolkitError(f"{path} line {i} is not a JSON metrics line: fix or delete that line") from None
        rows.append(row)
    return rows
