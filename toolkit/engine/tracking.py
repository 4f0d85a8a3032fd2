"""Metrics to `metrics.jsonl` in the output folder and to Accelerate's trackers (TensorBoard,
MLflow, Weights & Biases, ...: `training.report_to`)."""

from __future__ import annotations

import json
import math
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
                kept = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= resume_step]
                self.path.write_text("".join(ln + "\n" for ln in kept))

    def log(self, step: int, values: dict) -> None:
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in values.items()}
        self.accelerator.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=step)
        if self.accelerator.is_main_process:
            with self.path.open("a") as fh:
                fh.write(json.dumps({"step": step, **clean}) + "\n")


def read_metrics(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln] if path.is_file() else []
