"""Two processes train the NSP and ELECTRA objectives exactly as one does (slow: launches processes).

Pairs, masks and ELECTRA's sampled replacements depend only on (seed, epoch, example index), so
two processes with batch b give the losses of one process with batch 2b.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, run_cli, tiny_bert_recipe

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]


def _losses(output_dir) -> list[float]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [row["loss"] for row in map(json.loads, lines) if "loss" in row]


@pytest.mark.parametrize("objective", ["rtd", "mlm+nsp", "nsp"])
def test_two_processes_equal_one(tmp_path, corpus_dir, wordpiece_dir, objective):
    files = {}
    for procs, batch in ((1, 8), (2, 4)):
        recipe = tiny_bert_recipe(tmp_path / f"p{procs}", corpus_dir, wordpiece_dir, max_steps=4)
        recipe["training"].update(per_device_train_batch_size=batch, eval_on_start=False)
        recipe["objective"]["name"] = objective
        if objective == "rtd":
            recipe["model"]["architecture"] = "electra"
            recipe["model"]["config_overrides"]["embedding_size"] = 32
        files[procs] = tmp_path / f"p{procs}.yaml"
        files[procs].write_text(yaml.safe_dump(recipe))

    assert run_cli("pretrain", str(files[1])).returncode == 0
    env = {**os.environ, "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "1"}
    launch = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--main_process_port", "29617", "-m", "toolkit", "pretrain", str(files[2])]
    proc = subprocess.run(launch, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads(next((tmp_path / "p2" / "checkpoints").glob("*/trainer_state.json")).read_text())
    assert state["world_size"] == 2
    assert _losses(tmp_path / "p2") == pytest.approx(_losses(tmp_path / "p1"), abs=1e-5)
