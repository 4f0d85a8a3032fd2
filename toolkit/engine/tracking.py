"""Metrics to `metrics.jsonl` in the output folder and to Accelerate's trackers (TensorBoard)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


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
