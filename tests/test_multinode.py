"""The README's two-machine command, run for real as two "machines" on this host.

Two `accelerate launch --num_machines 2 --machine_rank 0/1 --main_process_ip 127.0.0.1` commands,
one process each, started together, rendezvous over TCP exactly as two hosts would (only the IP is
the loopback one); their run must equal one process with twice the batch.
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
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [row["loss"] for row in map(json.loads, lines) if "loss" in row]


def machine(rank: int, port: int, *args: str, launch: tuple = ("--multi_gpu",)) -> subprocess.Popen:
    """One "machine" of the README's command (CPU form: ACCELERATE_USE_CPU=1 and --multi_gpu, or the
    `launch` arguments given, e.g. a DeepSpeed config)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if "--multi_gpu" in launch:  # DeepSpeed finds the CPU by itself and refuses ACCELERATE_USE_CPU
        env["ACCELERATE_USE_CPU"] = "1"
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", *launch]
    cmd += ["--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank)]
    cmd += ["--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "-m", "toolkit", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_machines_of_one_process_equal_one_process_with_double_batch(tmp_path, corpus_dir, wordpiece_dir):
    recipe = tiny_bert_recipe(tmp_path / "unused", corpus_dir, wordpiece_dir, max_steps=3, eval_on_start=False)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    one = run_cli("pretrain", str(path), f"output_dir={tmp_path / 'one'}", "training.per_device_train_batch_size=16")
    assert one.returncode == 0, one.stderr[-3000:]

    args = ("pretrain", str(path), f"output_dir={tmp_path / 'two'}")  # per_device_train_batch_size=8 on each
    machines = [machine(rank, 29671, *args) for rank in (0, 1)]
    outputs = [m.communicate(timeout=900) for m in machines]
    for m, (_, err) in zip(machines, outputs):
        assert m.returncode == 0, err[-3000:]
    assert "2 process(es), ddp" in outputs[0][0]  # machine 0 holds the global main process and prints

    state = json.loads(next((tmp_path / "two" / "checkpoints").glob("*/trainer_state.json")).read_text())
    assert state["world_size"] == 2 and state["tokens_seen"] == 3 * 16 * 32
    # each machine wrote its own process's RNG state into the shared checkpoint folder
    assert {p.name for p in (tmp_path / "two" / "checkpoints" / "checkpoint-3").glob("random_states_*.pkl")} == {
        "random_states_0.pkl",
        "random_states_1.pkl",
    }
    reference = _losses(tmp_path / "one")
    assert len(reference) == 3
    assert _losses(tmp_path / "two") == pytest.approx(reference, abs=1e-5)


def test_two_machines_under_deepspeed_zero2_equal_one_process_with_double_batch(tmp_path, corpus_dir, wordpiece_dir):
    """The shipped ZeRO-2 launch config on two "machines" (accelerate's `standard` multi-node launcher:
    one `accelerate launch` per machine, as with DDP): optimizer states and gradients sharded across
    the machines, the same losses as one process with twice the batch."""
    recipe = tiny_bert_recipe(tmp_path / "unused", corpus_dir, wordpiece_dir, max_steps=3, eval_on_start=False)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    one = run_cli("pretrain", str(path), f"output_dir={tmp_path / 'one'}", "training.per_device_train_batch_size=16")
    assert one.returncode == 0, one.stderr[-3000:]

    launch = ("--config_file", "recipes/accelerate/deepspeed-zero2.yaml", "--deepspeed_multinode_launcher", "standard")
    args = ("pretrain", str(path), f"output_dir={tmp_path / 'two'}")
    machines = [machine(rank, 29673, *args, launch=launch) for rank in (0, 1)]
    outputs = [m.communicate(timeout=900) for m in machines]
    for m, (_, err) in zip(machines, outputs):
        assert m.returncode == 0, err[-3000:]
    state = json.loads(next((tmp_path / "two" / "checkpoints").glob("*/trainer_state.json")).read_text())
    assert state["world_size"] == 2 and state["engine"] == "deepspeed-zero2"
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), abs=1e-5)
