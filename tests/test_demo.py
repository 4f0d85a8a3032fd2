"""The demo connects the halves: the model it has just pretrained is fine-tuned on a suite task beside
its random-init twin, and both test accuracies are printed (tiny overrides: seconds, not minutes)."""

from __future__ import annotations

import importlib.util
import json
import re

import torch
from conftest import REPO, TINY_MODEL


def _demo():
    spec = importlib.util.spec_from_file_location("demo", REPO / "examples" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_prints_pretrained_and_random_init_accuracies(tmp_path, corpus_dir, wordpiece_dir, capsys):
    from transformers import AutoConfig, AutoModelForMaskedLM

    demo = _demo()
    pretraining = [
        f"data.train_files=[{corpus_dir}]",
        f"tokenizer.path={wordpiece_dir}",
        f"model.config_overrides={json.dumps(TINY_MODEL)}",
        "data.max_seq_length=32",
        "training.max_steps=2",
        "training.per_device_train_batch_size=8",
        "training.eval_steps=2",
        "training.max_eval_batches=1",
        "training.eval_on_start=false",
        "training.report_to=[]",
    ]
    finetuning = [
        "task.max_seq_length=32",
        "task.max_train_samples=32",
        "task.max_eval_samples=32",
        "task.max_test_samples=64",
        "training.num_train_epochs=1",
    ]
    args = ["--skip-minilm", "--outputs", str(tmp_path), *[f"--finetune={f}" for f in finetuning], *pretraining]
    assert demo.main(args) == 0
    out = capsys.readouterr().out

    assert "fill-mask with the saved model" in out
    printed = {
        "pretrained": float(re.search(r"pretrained on Shakespeare \(demo-mlm\):\s+([0-9.]+)", out).group(1)),
        "random init": float(re.search(r"random initialisation:\s+([0-9.]+)", out).group(1)),
    }
    # each printed accuracy is its own run's test accuracy (same task, seed and test rows)
    runs = tmp_path / "demo-downstream"
    for label, folder in (("pretrained", "pretrained"), ("random init", "random-init")):
        results = json.loads((runs / folder / "movie-sentiment" / "full" / "seed-42" / "results.json").read_text())
        assert abs(results["test_accuracy"] - printed[label]) < 5e-4  # printed with 3 decimals

    # the twin: the pretrained model's config and tokenizer, other (untrained) weights
    pretrained, twin = tmp_path / "demo-mlm", runs / "random-init-model"
    config = {k: v for k, v in AutoConfig.from_pretrained(pretrained).to_dict().items() if k != "_name_or_path"}
    assert {k: v for k, v in AutoConfig.from_pretrained(twin).to_dict().items() if k != "_name_or_path"} == config
    assert (twin / "tokenizer.json").read_text() == (pretrained / "tokenizer.json").read_text()
    a = AutoModelForMaskedLM.from_pretrained(pretrained).bert.encoder.layer[0].attention.self.query.weight
    b = AutoModelForMaskedLM.from_pretrained(twin).bert.encoder.layer[0].attention.self.query.weight
    assert not torch.equal(a, b)
