"""bench/data_pipeline.py at a tiny size: both paths tokenize the same text, and the report says so."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))  # the scripts import their shared helpers (bench/common.py) as scripts do
spec = importlib.util.spec_from_file_location("data_pipeline", REPO / "bench" / "data_pipeline.py")
data_pipeline = importlib.util.module_from_spec(spec)
spec.loader.exec_module(data_pipeline)


def test_the_corpus_is_the_installed_lines_repeated_to_size(tmp_path):
    lines = ["alpha beta", "gamma", "delta epsilon zeta"]
    path = tmp_path / "c.txt"
    written = data_pipeline.build_corpus(path, 0.0002, lines)  # 200 bytes: several shuffled repetitions
    text = path.read_text()
    assert written == len(text.encode()) and 200 <= written < 200 + 20
    rows = text.splitlines()
    assert set(rows) == set(lines) and "" not in rows
    assert rows[:3] != rows[3:6] or rows[3:6] != rows[6:9]  # each repetition in its own order


def test_both_paths_count_the_same_tokens_at_a_tiny_size(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "bench" / "data_pipeline.py"), "--sizes", "0.2", "--num-proc", "1"]
    proc = subprocess.run([*cmd, "--tmpdir", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    toolkit_tokens, stock_tokens = re.search(r"([\d,]+) text tokens \(toolkit\) / ([\d,]+) \(stock\)", out).groups()
    assert toolkit_tokens == stock_tokens and int(toolkit_tokens.replace(",", "")) > 10_000
    assert "tokens: equal" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("toolkit ", "stock "))}
    assert rows["toolkit"][-1] == "uint16" and rows["stock"][-1] == "int32"  # the smallest dtype for 30,522 ids
    assert float(rows["toolkit"][6]) < float(rows["stock"][6])  # cache MB: 2 bytes a token against 4 + masks
    assert re.fullmatch(r"ratio: \d+\.\d\d", out.strip().splitlines()[-1])
    assert list(tmp_path.iterdir()) == []  # corpora and caches deleted
