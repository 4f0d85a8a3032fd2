"""Tensor parallelism: 2 processes splitting every layer train exactly as one process does.

The multi-process tests launch `accelerate launch --multi_gpu --num_processes 2` on CPU (gloo) with
training.tensor_parallel_size=2 and compare the loss curve and the gathered final weights with a
one-process run; the unit tests check the plan and the refusals without launching anything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, TINY_GPT, TINY_MODEL, run_cli, tiny_bert_recipe, tiny_gpt_recipe

from toolkit.engine import parallel
from toolkit.errors import ToolkitError


def _losses(output_dir) -> list[float]:
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [row["loss"] for row in map(json.loads, lines) if "loss" in row]


def launch(n: int, *args: str, port: int = 29641) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "1"}
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", str(n)]
    cmd += ["--num_machines", "1", "--main_process_port", str(port), "-m", "toolkit", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def _weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


# ---- unit: the plan and the refusals ----------------------------------------------------------------


def _bert(**overrides):
    from transformers import BertConfig, BertForMaskedLM

    return BertForMaskedLM(BertConfig(vocab_size=100, **{**TINY_MODEL, **overrides}))


def _gpt2(**overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=32, **{**TINY_GPT, **overrides}))


def test_plan_splits_attention_and_ffn_of_every_block_and_nothing_else():
    plan = parallel.plan_for(_bert(num_hidden_layers=3))
    assert len(plan) == 3 * 6
    assert plan["bert.encoder.layer.2.attention.self.query"] == "colwise"
    assert plan["bert.encoder.layer.0.attention.output.dense"] == "rowwise"
    assert plan["bert.encoder.layer.1.intermediate.dense"] == "colwise"
    assert plan["bert.encoder.layer.1.output.dense"] == "rowwise"
    assert not any("embeddings" in n or n.startswith("cls.") for n in plan)  # replicated: the tie survives

    gpt = parallel.plan_for(_gpt2(), prefix="model.")
    assert gpt == {
        f"model.transformer.h.{i}.{suffix}": style for i in range(2) for suffix, style in parallel.GPT2_PLAN.items()
    }


def test_qkv_packing_gives_each_process_its_heads_and_round_trips():
    e, tp = 8, 2
    q, k, v = (torch.arange(e) + 100 * j for j in range(3))
    fused = torch.cat([q, k, v]).float()
    packed = parallel.pack_qkv(fused, tp)
    first = packed[: 3 * e // tp]  # what process 0 holds after an even column split
    assert first.tolist() == torch.cat([q[:4], k[:4], v[:4]]).float().tolist()
    assert torch.equal(parallel.unpack_qkv(packed, tp), fused)
    w = torch.randn(5, 3 * e)
    assert torch.equal(parallel.unpack_qkv(parallel.pack_qkv(w, tp), tp), w)


def test_sizes_the_split_cannot_divide_are_refused():
    with pytest.raises(ToolkitError, match=r"does not divide the model's 3 attention heads"):
        parallel.check_model(_bert(num_attention_heads=3, hidden_size=48).config, 2)
    with pytest.raises(ToolkitError, match=r"does not divide the model's 129 FFN units \(intermediate_size\)"):
        parallel.check_model(_bert(intermediate_size=129).config, 2)
    with pytest.raises(ToolkitError, match=r"does not divide the model's 2 attention heads \(n_head\)"):
        parallel.check_model(_gpt2().config, 4)
    parallel.check_model(_gpt2().config, 2)  # 2 heads, 128 units: fine
    with pytest.raises(ToolkitError, match=r"does not divide the 3 launched process"):
        parallel.check_layout(2, 3, "ddp")
    with pytest.raises(ToolkitError, match=r"cannot be combined with deepspeed-zero2"):
        parallel.check_layout(2, 2, "deepspeed-zero2")
    with pytest.raises(ToolkitError, match=r"cannot be combined with fsdp"):
        parallel.check_layout(2, 4, "fsdp")
    parallel.check_layout(2, 4, "ddp")


def test_tensor_parallel_size_below_one_is_refused():
    from toolkit.config import PretrainRecipe, resolve

    with pytest.raises(ToolkitError, match="tensor_parallel_size must be at least 1"):
        resolve(
            PretrainRecipe, {"output_dir": "x", "data": {"train_files": ["x"]}}, ["training.tensor_parallel_size=0"]
        )


def test_one_process_asked_for_two_way_tensor_parallelism_stops_before_training(tmp_path, corpus_dir, wordpiece_dir):
    recipe = tiny_bert_recipe(tmp_path / "out", corpus_dir, wordpiece_dir, tensor_parallel_size=2)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = run_cli("pretrain", str(path))
    assert proc.returncode != 0
    assert "tensor_parallel_size=2 does not divide the 1 launched process" in proc.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()


# ---- 2 processes over gloo: TP=2 equals one process -----------------------------------------------------


def _tied(folder) -> bool:
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    config = json.loads((Path(folder) / "config.json").read_text())
    auto = AutoModelForCausalLM if config["model_type"] == "gpt2" else AutoModelForMaskedLM
    model = auto.from_pretrained(str(folder))
    return model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


@pytest.mark.multiproc
@pytest.mark.parametrize("objective", ["mlm", "clm", "rtd"])
def test_two_way_tensor_parallel_equals_one_process(tmp_path, corpus_dir, wordpiece_dir, bpe_dir, objective):
    """3 AdamW steps, 2 processes each holding half of every block: the loss curve and the gathered weights
    of one process (CLM: GPT-2, whose fused q/k/v is split by heads; also resumed from a sharded checkpoint).
    MLM splits each step into 2 accumulated micro-batches of 4 against one process's batch of 8: every
    micro-batch's gradient must reach the optimizer, which under tensor parallelism accelerate does not wrap."""
    make = tiny_gpt_recipe if objective == "clm" else tiny_bert_recipe
    tokenizer = bpe_dir if objective == "clm" else wordpiece_dir
    recipe = make(tmp_path / "unused", corpus_dir, tokenizer, max_steps=3, eval_on_start=False, save_steps=2)
    if objective == "rtd":  # ELECTRA: both networks split; the generator needs 2 heads too (hidden 128 // 64)
        recipe["model"] = {"architecture": "electra", "size": "tiny", "config_overrides": dict(TINY_MODEL)}
        recipe["model"]["config_overrides"].update(hidden_size=128, embedding_size=32)
        recipe["objective"] = {"name": "rtd", "generator_hidden_fraction": 1.0}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))

    one = run_cli("pretrain", str(path), f"output_dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]
    accumulate = 2 if objective == "mlm" else 1
    split = [
        f"training.per_device_train_batch_size={8 // accumulate}",
        f"training.gradient_accumulation_steps={accumulate}",
    ]
    tp = launch(2, "pretrain", str(path), f"output_dir={tmp_path / 'tp'}", "training.tensor_parallel_size=2", *split)
    assert tp.returncode == 0, tp.stderr[-3000:]
    assert "tensor parallel 2 x data parallel 1" in tp.stdout

    state = json.loads((tmp_path / "tp" / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())
    assert (state["world_size"], state["tensor_parallel_size"]) == (2, 2)
    assert state["gradient_accumulation_steps"] == accumulate
    assert (tmp_path / "tp" / "checkpoints" / "checkpoint-3" / parallel.SHARDS_DIR).is_dir()

    reference = _losses(tmp_path / "one")
    assert len(reference) == 3
    assert _losses(tmp_path / "tp") == pytest.approx(reference, abs=1e-5)
    for sub in ("generator", "") if objective == "rtd" else ("",):
        full, split = _weights(tmp_path / "one" / sub), _weights(tmp_path / "tp" / sub)
        assert sorted(full) == sorted(split)
        worst = max((full[k] - split[k]).abs().max().item() for k in full)
        assert worst < 1e-5, (sub, worst)
    if objective == "rtd":
        return
    assert _tied(tmp_path / "tp")  # the gathered folder loads in plain transformers, decoder tied to embeddings
    if objective == "mlm":
        return
    # the shards of a checkpoint resume under the same layout: step 3 again, the same loss and weights
    resumed = launch(
        2,
        "pretrain",
        str(path),
        f"output_dir={tmp_path / 'resumed'}",
        "training.tensor_parallel_size=2",
        f"training.resume_from_checkpoint={tmp_path / 'tp' / 'checkpoints' / 'checkpoint-2'}",
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step 2" in resumed.stdout
    assert _losses(tmp_path / "resumed") == pytest.approx(reference[2:], abs=1e-5)
    again = _weights(tmp_path / "resumed")
    assert max((full[k] - again[k]).abs().max().item() for k in full) < 1e-5


# ---- fine-tuning: the encoder split with the same plan, the pooler and classifier replicated ---------------


@pytest.mark.parametrize("mode", ["frozen", "lora", "prompt", "cloze"])
def test_fine_tuning_modes_other_than_full_are_refused(mode):
    from toolkit.config import resolve
    from toolkit.finetuning.config import FinetuneRecipe

    recipe = {"model": {"model_name_or_path": "m"}, "task": {"train_file": "t.csv"}, "finetune": {"mode": mode}}
    recipe["prompt"] = {"template": "{text} It was {mask}.", "verbalizer": {"neg": "bad", "pos": "good"}}  # cloze's
    with pytest.raises(ToolkitError, match=f"fine-tunes with finetune.mode=full only .*; mode {mode} "):
        resolve(FinetuneRecipe, recipe, ["training.tensor_parallel_size=2"])
    resolve(FinetuneRecipe, recipe, ["training.tensor_parallel_size=1"])  # the mode itself is fine
    generation = {"model": {"model_name_or_path": "m"}, "task": {"train_file": "t.jsonl", "type": "generation"}}
    with pytest.raises(ToolkitError, match="cannot fine-tune task.type=generation: its test generations run on"):
        resolve(FinetuneRecipe, generation, ["training.tensor_parallel_size=2"])


@pytest.mark.multiproc
def test_two_way_tensor_parallel_full_fine_tuning_equals_one_process(tmp_path, wordpiece_dir):
    """Sequence classification on a tiny BERT, 20 AdamW steps: the loss curve, the test metrics and the saved
    classifier of one process; the gathered folder loads with AutoModelForSequenceClassification."""
    import csv
    import random

    from conftest import labelled_sentence
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForMaskedLM

    import toolkit

    tokenizer = AutoTokenizer.from_pretrained(wordpiece_dir)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **TINY_MODEL)
    BertForMaskedLM(config).save_pretrained(tmp_path / "bert")  # no pooler or classifier: new, seeded
    tokenizer.save_pretrained(tmp_path / "bert")
    rng = random.Random(0)
    with (tmp_path / "sentiment.csv").open("w", newline="") as fh:
        rows = [(labelled_sentence(rng, i % 2), "pos" if i % 2 else "neg") for i in range(64)]
        csv.writer(fh).writerows([("text", "label"), *rows])
    recipe = {
        "output_dir": str(tmp_path / "one"),
        "model": {"model_name_or_path": str(tmp_path / "bert")},
        "task": {"train_file": str(tmp_path / "sentiment.csv"), "validation_split": 0.25, "test_split": 0.25},
        "finetune": {"mode": "full"},
        "training": {"num_train_epochs": 5, "per_device_train_batch_size": 8, "learning_rate": 2e-3, "seed": 0},
    }
    recipe["task"]["max_seq_length"] = 32
    # the toy sentences' length gives the label away, so length-grouped batches would each hold one class
    recipe["training"].update(logging_steps=1, report_to=[], group_by_length=False)
    one = toolkit.finetune(recipe).metrics
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    tp = launch(2, "finetune", str(path), f"output_dir={tmp_path / 'tp'}", "training.tensor_parallel_size=2")
    assert tp.returncode == 0, tp.stderr[-3000:]
    assert "tensor parallel 2 x data parallel 1 (8 colwise, 4 rowwise layers)" in tp.stdout

    split = json.loads((tmp_path / "tp" / "results.json").read_text())
    assert (one["world_size"], one["tensor_parallel_size"]) == (1, 1)
    assert (split["world_size"], split["tensor_parallel_size"]) == (2, 2)
    reference = _losses(tmp_path / "one")
    assert len(reference) == 20
    assert _losses(tmp_path / "tp") == pytest.approx(reference, abs=1e-5)
    assert one["test_accuracy"] >= 0.75  # it learned: the comparison is not of two untrained classifiers
    tested = [k for k in one if k.startswith("test_") and isinstance(one[k], float)]
    assert {"test_loss", "test_accuracy", "test_macro_f1"} <= set(tested)
    for key in tested:
        assert split[key] == pytest.approx(one[key], abs=1e-5), key

    full, gathered = _weights(tmp_path / "one"), _weights(tmp_path / "tp")
    assert sorted(full) == sorted(gathered)
    assert max((full[k] - gathered[k]).abs().max().item() for k in full) < 1e-5
    texts = ["good noble king of denmark", "foul and cruel lord spoke", "the queen"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    logits = []
    for run in ("one", "tp"):
        model = AutoModelForSequenceClassification.from_pretrained(tmp_path / run).eval()
        with torch.no_grad():
            logits.append(model(**batch).logits)
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=1e-5)


# ---- slow: data parallel x tensor parallel (a 2-D mesh), bf16 --------------------------------------------------


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_data_parallel_copies_of_a_tensor_parallel_pair_equal_one_process(
    tmp_path, corpus_dir, wordpiece_dir, bpe_dir, objective
):
    """4 processes: 2 data-parallel copies x 2 tensor-parallel shards, batch 4 per copy, against one process's
    batch 8 (the copies' gradients averaged over the mesh's dp dimension, sums counted once per copy)."""
    make = tiny_gpt_recipe if objective == "clm" else tiny_bert_recipe
    tokenizer = bpe_dir if objective == "clm" else wordpiece_dir
    recipe = make(tmp_path / "unused", corpus_dir, tokenizer, max_steps=3, eval_on_start=False)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    one = run_cli("pretrain", str(path), f"output_dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]
    settings = ["training.tensor_parallel_size=2", "training.per_device_train_batch_size=4"]
    run = launch(4, "pretrain", str(path), f"output_dir={tmp_path / 'mesh'}", *settings, port=29642)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "4 process(es), ddp over gloo, tensor parallel 2 x data parallel 2" in run.stdout

    state = json.loads((tmp_path / "mesh" / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())
    assert (state["world_size"], state["tensor_parallel_size"]) == (4, 2)
    results = [json.loads((tmp_path / r / "results.json").read_text()) for r in ("one", "mesh")]
    assert (results[1]["world_size"], results[1]["tensor_parallel_size"]) == (4, 2)
    reference = _losses(tmp_path / "one")
    assert len(reference) == 3
    assert _losses(tmp_path / "mesh") == pytest.approx(reference, abs=1e-5)
    assert results[1]["eval_loss"] == pytest.approx(results[0]["eval_loss"], abs=1e-5)
    full, split = _weights(tmp_path / "one"), _weights(tmp_path / "mesh")
    assert sorted(full) == sorted(split)
    assert max((full[k] - split[k]).abs().max().item() for k in full) < 1e-5
    assert _tied(tmp_path / "mesh")


@pytest.mark.slow
@pytest.mark.multiproc
def test_bf16_autocast_under_tensor_parallelism_stays_close_to_one_process(tmp_path, corpus_dir, wordpiece_dir):
    """MLM under bf16 autocast (fp32 master weights), TP=2 against one process in bf16: finite losses that agree
    to bf16 rounding (1e-2), and differ from the fp32 run's, so that autocast did run on the split layers."""
    recipe = tiny_bert_recipe(tmp_path / "unused", corpus_dir, wordpiece_dir, max_steps=3, eval_on_start=False)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    for name, precision in (("fp32", "no"), ("bf16", "bf16")):
        one = run_cli("pretrain", str(path), f"output_dir={tmp_path / name}", f"training.mixed_precision={precision}")
        assert one.returncode == 0, one.stderr[-3000:]
    settings = ["training.tensor_parallel_size=2", "training.mixed_precision=bf16"]
    tp = launch(2, "pretrain", str(path), f"output_dir={tmp_path / 'tp'}", *settings, port=29643)
    assert tp.returncode == 0, tp.stderr[-3000:]
    assert "tensor parallel 2 x data parallel 1" in tp.stdout
    state = json.loads((tmp_path / "tp" / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())
    assert (state["world_size"], state["tensor_parallel_size"]) == (2, 2)

    bf16, fp32, split = (_losses(tmp_path / r) for r in ("bf16", "fp32", "tp"))
    assert len(split) == 3 and all(torch.isfinite(torch.tensor(split)))
    assert split == pytest.approx(bf16, abs=1e-2)
    assert max(abs(a - b) for a, b in zip(split, fp32)) > 1e-5  # fp32 and TP agree to 5e-7 (the tests above)
    results = [json.loads((tmp_path / r / "results.json").read_text()) for r in ("bf16", "tp")]
    assert results[1]["eval_loss"] == pytest.approx(results[0]["eval_loss"], abs=1e-2)
    full, gathered = _weights(tmp_path / "bf16"), _weights(tmp_path / "tp")
    assert all(v.dtype == torch.float32 for v in gathered.values())  # the masters, not bf16 copies
    assert max((full[k] - gathered[k]).abs().max().item() for k in full) < 1e-2
