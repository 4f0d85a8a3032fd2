"""Slow tier: issue 6's quality bar on the real MiniLM (fine-tuned on movie-sentiment, then quantized,
pruned and distilled by the shipped recipes). Run with `make test-slow` or `pytest -m slow`."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.slow
def test_compression_quality_bar():
    proc = subprocess.run(
        [sys.executable, "bench/compress_quality.py"], cwd=REPO, capture_output=True, text=True, timeout=3600
    )
    summary = proc.stdout[proc.stdout.rfind("---- quality bar") :]
    print(summary)
    assert proc.returncode == 0, summary or proc.stderr[-3000:]
    assert summary.count("PASS") == 4 and "FAIL" not in summary
