"""What the side-by-side benchmarks share: each path runs in its own process (for a clean peak-memory
figure) and hands its result back as one `RESULT {json}` line; the stock paths time the Trainer's
steps with one callback and pack text as transformers' `run_mlm.py` does."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from itertools import chain
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PREFIX = "RESULT "


def emit_result(result: dict) -> None:
    """In the child: add the process's peak resident memory and print the result line."""
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(PREFIX + json.dumps(result), flush=True)


def run_child(script: str, name: str, argv: list[str], env: dict | None = None) -> dict:
    """Run `script --run NAME ARGV...` in a fresh interpreter with the repository importable and the
    hubs offline; return the dict its `emit_result` printed. A failed child ends the benchmark with
    its output's tail."""
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **os.environ, **(env or {}), "PYTHONPATH": str(REPO)}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    proc = subprocess.run([sys.executable, script, "--run", name, *argv], capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(PREFIX)]
    if proc.returncode != 0 or not lines:
        print(proc.stdout[-3000:], proc.stderr[-5000:], file=sys.stderr)
        raise SystemExit(f"the {name} run failed (exit {proc.returncode})")
    return json.loads(lines[-1][len(PREFIX) :])


def step_timer():
    """A Trainer callback that records the end of every optimizer step (and the start of the first):
    `.durations()` gives each step's time, fetching its batch included."""
    from transformers import TrainerCallback

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []

        def on_step_begin(self, *a, **k):
            if not self.ends:
                self.ends.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            self.ends.append(time.perf_counter())

        def durations(self) -> list[float]:
            return [b - a for a, b in zip(self.ends, self.ends[1:])]

    return StepTimes()


def group_texts(block_size: int):
    """run_mlm.py's `group_texts`: concatenate a batch's columns and cut them into blocks of
    `block_size`, dropping the batch's remainder."""

    def group(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples}
        total = (len(concatenated["input_ids"]) // block_size) * block_size
        return {k: [t[i : i + block_size] for i in range(0, total, block_size)] for k, t in concatenated.items()}

    return group
