"""The output folder, checked before any work: writable, and not silently mixed with another run.

`prepare(out, training)` is what a run calls first (it returns the checkpoint to resume from);
`check_writable` and `check_output_dir` are its parts, for callers that plan the resume themselves.
"""

from __future__ import annotations

import errno
import os
import sys
import uuid
from pathlib import Path

from toolkit.engine import checkpoint
from toolkit.errors import ToolkitError

RUN_FILES = ("checkpoints", "metrics.jsonl", "runs")  # what makes a folder hold a run


def check_writable(out: str | Path, what: str = "output_dir") -> None:
    """`out` is a folder (or can become one) in which a file can be created: tested with a probe file
    in it, or in its nearest existing parent, created and removed again."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ToolkitError(f"{what} '{out}' is a file, not a folder: choose another {what} or move the file")
    probe_dir = out
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise ToolkitError(f"{what} '{out}' cannot be created: '{probe_dir}' is a file, not a folder")
    probe = probe_dir / f".toolkit-write-test-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        reason = {
            errno.EROFS: "the file system is read-only",
            errno.EACCES: "permission denied",
            errno.ENOSPC: "the disk is full",
        }.get(e.errno, e.strerror or str(e))
        raise ToolkitError(
            f"cannot write to {what} '{out}' ({reason} at '{probe_dir}'): choose a writable {what}"
        ) from None


def check_output_dir(out: str | Path, resume: Path | None, overwrite: bool, spec: str | None) -> None:
    """A new run must not silently mix with an old one in the same folder. Allowed: resuming
    (`resume` found), `overwrite`, a folder holding no run, and `spec == 'auto'` with nothing valid to
    resume (a crash before the first checkpoint: the run starts afresh there)."""
    out = Path(out)
    if resume is not None or overwrite or spec == "auto" or not out.is_dir():
        return
    if any((out / p).exists() for p in RUN_FILES):
        raise ToolkitError(
            f"output_dir '{out}' already holds a run: continue it with training.resume_from_checkpoint=auto, "
            "start over with training.overwrite_output_dir=true, or choose another output_dir"
        )


def prepare(out: str | Path, training) -> Path | None:
    """The checks a run makes first, in order: writable output_dir, the checkpoint to resume from
    (printing which, or why none), no mixing with another run. Returns the checkpoint or None."""
    check_writable(out)
    resume, note = checkpoint.plan_resume(out, training.resume_from_checkpoint)
    check_output_dir(out, resume, training.overwrite_output_dir, training.resume_from_checkpoint)
    if note and os.environ.get("RANK", "0") == "0":
        print(note, file=sys.stderr)
    return resume
