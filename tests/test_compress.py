"""Compression on tiny models: exact sparsity and clean saved folders, structured pruning sizes,
quantization closeness and size, the distillation loss and a short distillation run, the report,
and the bad inputs that must stop a run before any work."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, TINY_MODEL, labelled_sentence, run_cli

import toolkit
from toolkit.errors import ToolkitError


@pytest.fixture(scope="session")
def sentiment_csv(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("labelled") / "sentiment.csv"
    rng = random.Random(0)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows((labelled_sentence(rng, i % 2), "pos" if i % 2 else "neg") for i in range(160))
    return path


def task(train_file) -> dict:
    return {
        "train_file": str(train_file),
        "max_seq_length": 16,
        "validation_split": 0.2,
        "test_split": 0.2,
    }


TRAINING = {"per_device_train_batch_size": 8, "per_device_eval_batch_size": 32, "logging_steps": 4, "seed": 0}


@pytest.fixture(scope="session")
def classifier(tmp_path_factory, wordpiece_dir, sentiment_csv) -> Path:
    """A tiny BERT (4 heads) fine-tuned on the sentiment file: the model every method compresses."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    base = tmp_path_factory.mktemp("ckpt") / "bert"
    tokenizer = AutoTokenizer.from_pretrained(wordpiece_dir)
    config = BertConfig(
        vocab_size=len(tokenizer), **{**TINY_MODEL, "num_attention_heads": 4}, max_position_embeddings=64
    )
    torch.manual_seed(0)
    BertForMaskedLM(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    out = tmp_path_factory.mktemp("ckpt") / "classifier"
    toolkit.finetune(
        {
            "output_dir": str(out),
            "model": {"model_name_or_path": str(base)},
            "task": task(sentiment_csv),
            "finetune": {"mode": "full"},
            "training": {**TRAINING, "num_train_epochs": 6, "learning_rate": 2e-3},
        }
    )
    return out


def compress_recipe(out, model, sentiment_csv, **compress) -> dict:
    return {
        "output_dir": str(out),
        "model": {"model_name_or_path": str(model)},
        "task": task(sentiment_csv),
        "compress": compress,
        "training": dict(TRAINING),
        "report": {"latency_batch_size": 4, "latency_repeats": 3, "compile": False},
    }


def safetensors_keys(folder: Path) -> list[str]:
    from safetensors import safe_open

    keys, files = [], sorted(folder.glob("*.safetensors"))
    assert files, f"no .safetensors file in {folder}"  # a missing model must not pass as one without masks
    for f in files:
        with safe_open(str(f), "pt") as fh:
            keys += list(fh.keys())
    return keys


# ---- unstructured pruning --------------------------------------------------------------------------


def test_unstructured_pruning_is_exact_permanent_and_reloads(tmp_path, classifier, sentiment_csv):
    from transformers import AutoModelForSequenceClassification

    from toolkit.compression.prune import prunable_weights

    result = toolkit.compress(compress_recipe(tmp_path / "c", classifier, sentiment_csv, method="prune", sparsity=0.6))
    folder = tmp_path / "c" / "pruned"
    keys = safetensors_keys(folder)
    assert keys and not [k for k in keys if k.endswith(("_orig", "_mask"))]

    model = AutoModelForSequenceClassification.from_pretrained(folder)  # plain transformers
    weights = [getattr(m, n) for m, n in prunable_weights(model)]
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros == round(0.6 * total)  # exactly the requested share, counted in the saved model
    head = model.classifier.weight
    assert int((head == 0).sum()) == 0  # the head is left whole

    ids = torch.randint(5, 100, (3, 12))
    with torch.inference_mode():
        assert torch.allclose(model(input_ids=ids).logits, result.models["pruned"](input_ids=ids).logits, atol=1e-6)

    rows = {r["model"]: r for r in csv.DictReader((tmp_path / "c" / "report.csv").open())}
    assert set(rows) == {"original", "pruned"}
    assert int(rows["pruned"]["params"]) == int(rows["original"]["params"])
    assert int(rows["original"]["nonzero_params"]) - int(rows["pruned"]["nonzero_params"]) >= zeros * 0.99
    assert (tmp_path / "c" / "report.md").read_text().count("| pruned |") == 1
    assert (tmp_path / "c" / "report.png").stat().st_size > 1000


def test_recovery_keeps_pruned_weights_at_zero(tmp_path, classifier, sentiment_csv):
    from transformers import AutoModelForSequenceClassification

    from toolkit.compression.prune import prunable_weights

    recipe = compress_recipe(tmp_path / "c", classifier, sentiment_csv, method="prune", sparsity=0.5)
    recipe["compress"]["recovery_epochs"] = 1
    recipe["training"]["learning_rate"] = 1e-2
    toolkit.compress(recipe)
    before = AutoModelForSequenceClassification.from_pretrained(tmp_path / "c" / "pruned")
    after = AutoModelForSequenceClassification.from_pretrained(tmp_path / "c" / "pruned-recovered")
    changed = False
    for (m0, n), (m1, _) in zip(prunable_weights(before), prunable_weights(after)):
        w0, w1 = getattr(m0, n), getattr(m1, n)
        assert torch.equal(w1[w0 == 0], torch.zeros_like(w1[w0 == 0]))  # pruned stay pruned
        changed |= not torch.equal(w0[w0 != 0], w1[w0 != 0])  # the rest trained
    assert changed
    assert not [k for k in safetensors_keys(tmp_path / "c" / "pruned-recovered") if k.endswith(("_orig", "_mask"))]
    results = json.loads((tmp_path / "c" / "results.json").read_text())
    assert [r["model"] for r in results["rows"]] == ["original", "pruned", "pruned-recovered"]
    # the recovery run is an ordinary run: its checkpoints and its folder carry the resolved recipe
    recovered = tmp_path / "c" / "pruned-recovered"
    checkpoints = sorted((recovered / "checkpoints").glob("checkpoint-*"))
    assert checkpoints and all((c / "recipe.yaml").is_file() for c in checkpoints)
    assert yaml.safe_load((recovered / "recipe.yaml").read_text())["compress"]["recovery_epochs"] == 1


# ---- structured pruning ----------------------------------------------------------------------------


def test_structured_pruning_shrinks_the_config_and_the_report(tmp_path, classifier, sentiment_csv):
    from transformers import AutoModelForSequenceClassification

    recipe = compress_recipe(
        tmp_path / "c", classifier, sentiment_csv, method="prune", sparsity=0.5, structured=True, importance_batches=4
    )
    result = toolkit.compress(recipe)
    folder = tmp_path / "c" / "pruned-structured"
    config = json.loads((folder / "config.json").read_text())
    assert config["num_attention_heads"] == 2 and config["intermediate_size"] == 64
    model = AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
    hidden, layers, inter, heads, head_size = 64, 2, 64, 2, 16
    per_layer = 3 * (hidden * heads * head_size + heads * head_size) + (heads * head_size * hidden + hidden)
    per_layer += hidden * inter + inter + inter * hidden + hidden + 4 * hidden  # FFN + two LayerNorms
    original = AutoModelForSequenceClassification.from_pretrained(classifier)
    removed = sum(p.numel() for p in original.parameters()) - sum(p.numel() for p in model.parameters())
    full_layer = 3 * (hidden * hidden + hidden) + hidden * hidden + hidden + 2 * (hidden * 128) + 128 + hidden
    full_layer += 4 * hidden
    assert removed == layers * (full_layer - per_layer)
    rows = {r.name: r for r in result.rows}
    assert rows["pruned-structured"].params == rows["original"].params - removed
    assert rows["pruned-structured"].size_bytes < rows["original"].size_bytes


# ---- quantization ----------------------------------------------------------------------------------


def test_int8_dynamic_quantization_stays_close_and_is_smaller(tmp_path, classifier, sentiment_csv):
    from transformers import AutoModelForSequenceClassification

    recipe = compress_recipe(tmp_path / "c", classifier, sentiment_csv, method="quantize", schemes=["int8_dynamic"])
    result = toolkit.compress(recipe)
    rows = {r.name: r for r in result.rows}
    assert rows["int8_dynamic"].size_bytes < 0.8 * rows["original"].size_bytes
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "c" / "int8_dynamic", device_map="cpu")
    assert type(reloaded.bert.encoder.layer[0].attention.self.query.weight).__name__ != "Parameter"
    original = AutoModelForSequenceClassification.from_pretrained(classifier)
    ids = torch.randint(5, 100, (8, 16))
    with torch.inference_mode():
        a, b = original(input_ids=ids).logits, reloaded(input_ids=ids).logits
    # int8 weights and activations: logits within 5% of their spread, and the same decisions
    assert (a - b).abs().max() <= 0.05 * a.abs().max() + 1e-3
    assert rows["int8_dynamic"].metrics["agreement"] >= 0.9
    assert abs(rows["int8_dynamic"].metrics["accuracy"] - rows["original"].metrics["accuracy"]) <= 0.1


def test_bitsandbytes_schemes_reload_quantized(tmp_path, classifier, sentiment_csv):
    recipe = compress_recipe(
        tmp_path / "c", classifier, sentiment_csv, method="quantize", schemes=["bnb_8bit", "bnb_4bit"]
    )
    result = toolkit.compress(recipe)
    rows = {r.name: r for r in result.rows}
    assert rows["bnb_4bit"].size_bytes < rows["bnb_8bit"].size_bytes < rows["original"].size_bytes
    assert rows["bnb_4bit"].params == rows["original"].params  # values counted, not packed bytes
    assert rows["bnb_8bit"].metrics["agreement"] >= 0.9


# ---- distillation ----------------------------------------------------------------------------------


def test_kd_loss_is_zero_for_equal_logits_and_positive_otherwise():
    from toolkit.compression.distill import kd_loss

    logits = torch.randn(5, 3)
    assert kd_loss(logits, logits.clone(), 2.0).abs() < 1e-6
    other = logits + torch.randn(5, 3)
    assert kd_loss(other, logits, 2.0) > 1e-3
    assert kd_loss(logits + 7.0, logits, 2.0).abs() < 1e-5  # softmax is shift-invariant


def test_distillation_student_learns_to_agree_with_the_teacher(tmp_path, classifier, sentiment_csv):
    from transformers import AutoModelForSequenceClassification

    from toolkit.engine.tracking import read_metrics

    recipe = compress_recipe(
        tmp_path / "c", classifier, sentiment_csv, method="distill", teacher=str(classifier), student_layers=1
    )
    recipe["model"] = {}
    # a smaller feed-forward size: the student starts from random weights, far from the teacher
    recipe["compress"].update(baseline=False, temperature=2.0, alpha=0.9, student_config={"intermediate_size": 96})
    recipe["training"].update(num_train_epochs=4, learning_rate=3e-3, eval_on_start=True, eval_steps=4)
    result = toolkit.compress(recipe)
    student = AutoModelForSequenceClassification.from_pretrained(tmp_path / "c" / "student")
    assert student.config.num_hidden_layers == 1
    evals = [
        m["eval_teacher_agreement"] for m in read_metrics(tmp_path / "c" / "student") if "eval_teacher_agreement" in m
    ]
    kd = [m["eval_kd_loss"] for m in read_metrics(tmp_path / "c" / "student") if "eval_kd_loss" in m]
    assert len(evals) >= 3 and evals[-1] > evals[0] and kd[-1] < kd[0]
    assert student.config.intermediate_size == 96
    rows = {r.name: r for r in result.rows}
    assert rows["student"].params < rows["teacher"].params
    checkpoints = sorted((tmp_path / "c" / "student" / "checkpoints").glob("checkpoint-*"))
    assert checkpoints and all((c / "recipe.yaml").is_file() for c in checkpoints)
    saved = yaml.safe_load((checkpoints[-1] / "recipe.yaml").read_text())
    assert saved["compress"]["method"] == "distill" and saved["compress"]["alpha"] == 0.9


def test_student_layers_are_copied_from_the_teacher(classifier):
    from transformers import AutoModelForSequenceClassification

    from toolkit.compression.distill import build_student, layer_indices

    assert layer_indices(3, 6) == [0, 2, 5]
    assert layer_indices(1, 6) == [5]
    from toolkit.compression.config import CompressRecipe
    from toolkit.config import resolve

    recipe = resolve(CompressRecipe, REPO / "recipes" / "compress-distill.yaml", ["compress.student_layers=3"])
    assert recipe.compress.student_layers == 3  # a count stays a count (not the list [3])
    assert resolve(
        CompressRecipe, REPO / "recipes" / "compress-distill.yaml", ["compress.student_layers=[1]"]
    ).compress.student_layers == [1]
    assert layer_indices([4, 1], 6) == [1, 4]
    teacher = AutoModelForSequenceClassification.from_pretrained(classifier)
    student, _ = build_student(AutoModelForSequenceClassification, str(classifier), teacher.config, [1], {})
    assert student.config.num_hidden_layers == 1
    for name, p in student.bert.encoder.layer[0].named_parameters():
        assert torch.equal(p, teacher.bert.encoder.layer[1].get_parameter(name))
    assert torch.equal(student.classifier.weight, teacher.classifier.weight)


# ---- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "compress, message",
    [
        ({"method": "prune", "sparsity": 1.0}, "between 0 and 1"),
        ({"method": "prune", "sparsity": 0}, "between 0 and 1"),
        ({"method": "quantize", "schemes": ["int4_magic"]}, "compress.schemes"),
        ({"method": "distill"}, "compress.teacher"),
        ({"method": "distill", "teacher": "x", "student_layers": "two"}, "student_layers"),
        ({"method": "shrink"}, "compress.method"),
    ],
)
def test_bad_recipes_are_refused_before_work(tmp_path, classifier, sentiment_csv, compress, message):
    with pytest.raises(ToolkitError, match=message):
        toolkit.compress(compress_recipe(tmp_path / "c", classifier, sentiment_csv, **compress))
    assert not (tmp_path / "c").exists()


def test_distillation_refuses_other_tokenizers_and_label_sets(tmp_path, classifier, sentiment_csv, bpe_dir):
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertForSequenceClassification

    # a student checkpoint (an encoder) with another tokenizer
    other = tmp_path / "other"
    tok = AutoTokenizer.from_pretrained(bpe_dir)
    BertForMaskedLM(BertConfig(vocab_size=len(tok), **TINY_MODEL)).save_pretrained(other)
    tok.save_pretrained(other)
    recipe = compress_recipe(tmp_path / "c", other, sentiment_csv, method="distill", teacher=str(classifier))
    with pytest.raises(ToolkitError, match="tokenize text differently"):
        toolkit.compress(recipe)
    # a student classifier with other classes
    labels = tmp_path / "labels"
    config = BertConfig.from_pretrained(classifier)
    config.id2label, config.label2id = {0: "a", 1: "b", 2: "c"}, {"a": 0, "b": 1, "c": 2}
    BertForSequenceClassification(config).save_pretrained(labels)
    AutoTokenizer.from_pretrained(classifier).save_pretrained(labels)
    recipe = compress_recipe(tmp_path / "c", labels, sentiment_csv, method="distill", teacher=str(classifier))
    with pytest.raises(ToolkitError, match="same label set"):
        toolkit.compress(recipe)
    assert not (tmp_path / "c").exists()


def test_unavailable_quantization_is_a_clear_error(tmp_path, classifier, sentiment_csv, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name.startswith("bitsandbytes"):
            raise ImportError("no bitsandbytes here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(ToolkitError, match="needs bitsandbytes"):
        toolkit.compress(
            compress_recipe(tmp_path / "c", classifier, sentiment_csv, method="quantize", schemes=["bnb_8bit"])
        )
    assert not (tmp_path / "c").exists()


def test_cli_compress_bad_sparsity_exits_2_without_traceback(tmp_path):
    proc = run_cli("compress", "recipes/compress-prune.yaml", "compress.sparsity=1.5", f"output_dir={tmp_path / 'c'}")
    assert proc.returncode == 2
    assert "compress.sparsity=1.5 must be between 0 and 1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_masked_lm_distillation_on_raw_text(tmp_path, wordpiece_dir, corpus_dir):
    from transformers import AutoModelForMaskedLM, AutoTokenizer, BertConfig, BertForMaskedLM

    from toolkit.engine.tracking import read_metrics

    teacher_dir = tmp_path / "teacher"
    tokenizer = AutoTokenizer.from_pretrained(wordpiece_dir)
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), **TINY_MODEL)).save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    recipe = {
        "output_dir": str(tmp_path / "c"),
        "data": {"train_files": [str(corpus_dir)], "max_seq_length": 32, "validation_split_percentage": 10},
        "compress": {
            "method": "distill",
            "objective": "mlm",
            "teacher": str(teacher_dir),
            "student_layers": 1,
            "student_config": {"intermediate_size": 64},
            "alpha": 1.0,
        },
        "training": {**TRAINING, "max_steps": 12, "learning_rate": 3e-3, "eval_steps": 6, "max_eval_batches": 2},
        "report": {"latency_batch_size": 4, "latency_repeats": 3, "compile": False},
    }
    result = toolkit.compress(recipe)
    assert [r.name for r in result.rows] == ["teacher", "baseline", "student"]
    for row in result.rows:
        assert 0 < row.metrics["mlm_loss"] < 20 and 0 <= row.metrics["mlm_accuracy"] <= 1
    student = AutoModelForMaskedLM.from_pretrained(tmp_path / "c" / "student")
    assert student.config.num_hidden_layers == 1 and student.config.intermediate_size == 64
    kd = [m["eval_kd_loss"] for m in read_metrics(tmp_path / "c" / "student") if "eval_kd_loss" in m]
    assert len(kd) >= 2 and kd[-1] < kd[0]  # the student moves towards the teacher's distributions


def test_cli_compress_writes_the_report(tmp_path, classifier, sentiment_csv):
    proc = run_cli(
        "compress",
        "recipes/compress-prune.yaml",
        f"output_dir={tmp_path / 'c'}",
        f"model.model_name_or_path={classifier}",
        "task.name=null",
        f"task.train_file={sentiment_csv}",
        "task.max_seq_length=16",
        "task.validation_split=0.2",
        "task.test_split=0.2",
        "compress.recovery_epochs=0",
        "report.latency_batch_size=4",
        "report.latency_repeats=2",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = (tmp_path / "c" / "report.md").read_text()
    assert "| original |" in table and "| pruned |" in table and "median of 2 forward passes" in table
    assert "compiled (torch.compile" in table and "torch.compile failed" not in table
    assert "report written to" in proc.stdout


@pytest.mark.multiproc
def test_distillation_under_two_processes_equals_one(tmp_path, classifier, sentiment_csv):
    """Distillation runs on the engine: 2 processes x batch 4 take the steps of 1 process x batch 8."""
    import os
    import subprocess
    import sys

    import yaml

    files = {}
    for procs, batch in ((1, 8), (2, 4)):
        recipe = compress_recipe(
            tmp_path / f"p{procs}", classifier, sentiment_csv, method="distill", teacher=str(classifier)
        )
        recipe["model"] = {}
        recipe["compress"].update(student_layers=1, baseline=False, student_config={"intermediate_size": 96})
        recipe["training"].update(per_device_train_batch_size=batch, max_steps=6, logging_steps=1, learning_rate=3e-3)
        files[procs] = tmp_path / f"p{procs}.yaml"
        files[procs].write_text(yaml.safe_dump(recipe))
    assert run_cli("compress", str(files[1])).returncode == 0
    env = {**os.environ, "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "1"}
    launch = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--main_process_port", "29623", "-m", "toolkit", "compress", str(files[2])]
    proc = subprocess.run(launch, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def losses(folder):
        rows = [json.loads(line) for line in (folder / "student" / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r]

    assert len(losses(tmp_path / "p1")) == 6
    assert losses(tmp_path / "p2") == pytest.approx(losses(tmp_path / "p1"), abs=1e-5)
    report = (tmp_path / "p2" / "report.md").read_text()
    assert report.count("| student |") == 1 and report.count("| teacher |") == 1
