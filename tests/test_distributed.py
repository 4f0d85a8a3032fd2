"""The same run split three ways gives the same loss curve: 2 processes x batch b, 1 process x batch
2b, 1 process x batch b x 2 accumulation steps (dropout off; masking seeded per example)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import REPO, run_cli, tiny_bert_recipe

from toolkit.engine.checkpoint import complete_checkpoints, read_state
from toolkit.engine.tracking import read_metrics


def _losses(out) -> list[float]:
    return [m["loss"] for m in read_metrics(out) if "loss" in m]


def launch_two_processes(*args: str) -> subprocess.CompletedProcess:
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    env = {**os.environ, "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "1"}
    cmd = [
        accelerate,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--main_process_port",
        "29533",
        "-m",
        "toolkit",
        *args,
    ]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.multiproc
def test_two_processes_equal_one_process_with_double_batch_and_with_accumulation(tmp_path, corpus_dir, wordpiece_dir):
    recipe = tiny_bert_recipe(
        tmp_path / "unused", corpus_dir, wordpiece_dir, max_steps=8, per_device_train_batch_size=4, eval_on_start=False
    )
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))

    ddp = launch_two_processes("pretrain", str(path), f"output_dir={tmp_path / 'ddp'}")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert read_state(complete_checkpoints(tmp_path / "ddp")[-1][1])["world_size"] == 2
    big = run_cli("pretrain", str(path), f"output_dir={tmp_path / 'big'}", "training.per_device_train_batch_size=8")
    acc = run_cli("pretrain", str(path), f"output_dir={tmp_path / 'acc'}", "training.gradient_accumulation_steps=2")
    assert big.returncode == 0 and acc.returncode == 0, big.stderr[-2000:] + acc.stderr[-2000:]

    reference = _losses(tmp_path / "big")
    assert len(reference) == 8 and reference[-1] < reference[0]
    for name in ("ddp", "acc"):
        other = _losses(tmp_path / name)
        diffs = [abs(a - b) for a, b in zip(other, reference)]
        assert len(other) == 8
        assert max(diffs) < 1e-4, (name, diffs)  # largest per-step difference
        assert sum(diffs) / len(diffs) < 2e-5, (name, diffs)  # mean difference
    summary = json.loads((tmp_path / "ddp" / "checkpoints").joinpath("checkpoint-8", "trainer_state.json").read_text())
    assert summary["tokens_seen"] == 8 * 8 * 32


@pytest.mark.multiproc
def test_capped_evaluation_is_the_same_set_with_two_processes(tmp_path, corpus_dir, wordpiece_dir):
    """training.max_eval_batches caps the *global* evaluation set (its first 2 x 16 blocks), which the
    processes then share: the same model scores the same eval_loss and accuracy on 2 processes as on 1.
    Masking in evaluation is seeded per example, so only the set of blocks could differ (a per-process
    cap let 2 processes evaluate 64 blocks where 1 evaluated 32)."""
    recipe = tiny_bert_recipe(
        tmp_path / "unused",
        corpus_dir,
        wordpiece_dir,
        max_steps=1,
        warmup_steps=0,
        per_device_train_batch_size=4,
        max_eval_batches=2,
    )
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))

    two = launch_two_processes("pretrain", str(path), f"output_dir={tmp_path / 'two'}")
    assert two.returncode == 0, two.stderr[-3000:]
    assert read_state(complete_checkpoints(tmp_path / "two")[-1][1])["world_size"] == 2
    # one process with the same global batch (2 x 4), so the model after the step is the same too
    one = run_cli("pretrain", str(path), f"output_dir={tmp_path / 'one'}", "training.per_device_train_batch_size=8")
    assert one.returncode == 0, one.stderr[-2000:]
    validation_blocks = int(re.search(r"validation (\d+) blocks", one.stdout).group(1))
    assert validation_blocks >= 2 * 2 * 16  # enough blocks that a per-process cap would take more on 2 processes

    def evals(out) -> list[dict]:
        return [m for m in read_metrics(out) if "eval_loss" in m]

    (before_1, after_1), (before_2, after_2) = evals(tmp_path / "one"), evals(tmp_path / "two")
    assert before_1["step"] == before_2["step"] == 0 and after_1["step"] == after_2["step"] == 1
    # the same initial model: equal up to the order of the sums
    assert before_2["eval_loss"] == pytest.approx(before_1["eval_loss"], abs=1e-5)
    assert before_2["eval_mlm_accuracy"] == pytest.approx(before_1["eval_mlm_accuracy"], abs=1e-9)
    # after one step of the same global batch
    assert after_2["eval_loss"] == pytest.approx(after_1["eval_loss"], abs=1e-4)
    assert after_1["eval_loss"] != pytest.approx(before_1["eval_loss"], abs=1e-4)  # the step did move the model


@pytest.mark.multiproc
def test_two_process_resume_with_dropout_is_exact(tmp_path, corpus_dir, wordpiece_dir):
    """Every process's RNG state is restored and nothing draws from it before the next step (the CPU
    peak probe, measured at start-up, once did: a resumed run's dropout masks differed from step 4)."""
    from safetensors.torch import load_file

    recipe = tiny_bert_recipe(
        tmp_path / "ddp", corpus_dir, wordpiece_dir, max_steps=6, save_steps=3, save_total_limit=5, eval_steps=0
    )
    recipe["training"].update(logging_steps=1, eval_on_start=False)
    recipe["model"]["config_overrides"].update(hidden_dropout_prob=0.1)
    path, out = tmp_path / "r.yaml", tmp_path / "ddp"
    path.write_text(yaml.safe_dump(recipe))
    first = launch_two_processes("pretrain", str(path))
    assert first.returncode == 0, first.stderr[-3000:]
    assert read_state(out / "checkpoints" / "checkpoint-3")["world_size"] == 2
    losses, weights = _losses(out), load_file(str(out / "model.safetensors"))
    assert len(losses) == 6
    shutil.rmtree(out / "checkpoints" / "checkpoint-6")
    (out / "model.safetensors").unlink()
    again = launch_two_processes("pretrain", str(path), "training.resume_from_checkpoint=auto")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed at step 3" in again.stdout
    assert _losses(out) == losses  # exactly: the same batches, masks and dropout
    for k, v in load_file(str(out / "model.safetensors")).items():
        assert torch.equal(v, weights[k]), k
