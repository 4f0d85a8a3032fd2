"""Checkpoints of the whole run state, written atomically, kept to the newest K.

A checkpoint folder holds what `accelerator.save_state` writes (model, optimizer, scheduler, every
process's RNG states), plus `trainer_state.json` (step, epoch, tokens seen, world size) and the
files needed to use it on its own (the resolved recipe and the tokenizer). It is written under a
temporary name and renamed when complete, so `resume_from_checkpoint: auto` never picks a folder
that a crash left half-written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from toolkit.errors import ToolkitError

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    root = checkpoints_dir(output_dir)
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = _NAME.match(p.name)
            if m and (p / STATE_FILE).is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def resolve_resume(output_dir: str | Path, spec: str | None) -> Path | None:
    """'auto' -> the newest complete checkpoint (or None); a path -> that checkpoint, checked."""
    if spec is None:
        return None
    if spec == "auto":
        found = complete_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(spec)
    if not path.is_dir():
        raise ToolkitError(f"training.resume_from_checkpoint: folder not found: '{spec}'")
    if not (path / STATE_FILE).is_file():
        raise ToolkitError(
            f"'{spec}' is not a complete checkpoint (no {STATE_FILE}): pick a checkpoint-N folder "
            "under output_dir/checkpoints, or use training.resume_from_checkpoint=auto"
        )
    return path


def read_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text())


def save(accelerator, output_dir: str | Path, step: int, state: dict, write_extras, keep: int, shards=None) -> Path:
    """Save the run state at `step`. Every process must call this (sharded states save in parts;
    `shards(folder)` writes what accelerate does not hold, e.g. tensor-parallel model and optimizer shards)."""
    root = checkpoints_dir(output_dir)
    final = root / f"checkpoint-{step}"
    tmp = root / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if shards is not None:
        shards(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_extras(tmp)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in complete_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
