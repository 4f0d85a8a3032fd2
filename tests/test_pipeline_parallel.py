"""Pipeline parallelism: 2 processes, each holding half of the layers, train exactly as one process does.

The multi-process tests launch `accelerate launch --multi_gpu --num_processes 2` on CPU (gloo) with
training.pipeline_parallel_size=2 and compare the loss curve and the gathered final weights with a
one-process run; the unit tests check the split and the refusals without launching anything.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_GPT, TINY_MODEL, run_cli, tiny_bert_recipe, tiny_gpt_recipe
from test_tensor_parallel import launch

from toolkit.config import PretrainRecipe, resolve
from toolkit.engine import pipeline
from toolkit.errors import ToolkitError


def losses_of(output_dir) -> list[float]:
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [row["loss"] for row in map(json.loads, lines) if "loss" in row]


def weights_of(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


def recipe_with(**training) -> PretrainRecipe:
    return resolve(
        PretrainRecipe,
        {"output_dir": "x", "data": {"train_files": ["x"]}, "model": {"config_overrides": dict(TINY_MODEL)}},
        [f"training.{k}={v}" for k, v in training.items()],
    )


# ---- unit: the split and the refusals -----------------------------------------------------------------


def test_stages_take_consecutive_even_shares_of_the_layers():
    assert [pipeline.bounds(2, 2, s) for s in range(2)] == [(0, 1), (1, 2)]
    assert [pipeline.bounds(5, 2, s) for s in range(2)] == [(0, 3), (3, 5)]
    assert [pipeline.bounds(12, 4, s) for s in range(4)] == [(0, 3), (3, 6), (6, 9), (9, 12)]
    assert [pipeline.bounds(7, 3, s) for s in range(3)] == [(0, 3), (3, 5), (5, 7)]


def test_micro_batches_default_to_the_largest_divisor_up_to_four_per_stage():
    assert pipeline.micro_batches(recipe_with(pipeline_parallel_size=2).training) == 8  # batch 32
    t = recipe_with(pipeline_parallel_size=2, per_device_train_batch_size=6).training
    assert pipeline.micro_batches(t) == 6
    t = recipe_with(pipeline_parallel_size=2, per_device_train_batch_size=12, pipeline_micro_batches=3).training
    assert pipeline.micro_batches(t) == 3


def test_splits_cover_every_weight_once_and_keep_the_tie_on_the_first_and_last_stage():
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

    from toolkit.objectives.clm import CausalLM
    from toolkit.objectives.mlm import MaskedLM

    bert = MaskedLM(BertForMaskedLM(BertConfig(vocab_size=100, **{**TINY_MODEL, "num_hidden_layers": 3})), None)
    gpt = CausalLM(GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=32, **TINY_GPT)), None)
    for objective, tied in ((bert, bert.model.bert.embeddings.word_embeddings.weight), (gpt, gpt.model.lm_head.weight)):
        split = objective.pipeline_split()
        stages = [pipeline.Stage(split, s, 2) for s in range(2)]
        held = [{id(p) for p in stage.parameters()} for stage in stages]
        every = {id(p) for p in objective.parameters()}
        assert held[0] | held[1] == every
        assert held[0] & held[1] == {id(tied)}  # the only weight on both stages: the tied embedding / decoder
    assert [len(pipeline.Stage(bert.pipeline_split(), s, 2).blocks) for s in range(2)] == [2, 1]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"pipeline_parallel_size": 3}, r"pipeline_parallel_size=3 asks for more stages than the model's 2 layers"),
        ({"pipeline_parallel_size": 0}, r"pipeline_parallel_size must be at least 1"),
        (
            {"pipeline_parallel_size": 2, "tensor_parallel_size": 2},
            r"cannot be combined with training.tensor_parallel_size=2",
        ),
        (
            {"pipeline_parallel_size": 2, "per_device_train_batch_size": 6, "pipeline_micro_batches": 4},
            r"pipeline_micro_batches=4 does not divide training.per_device_train_batch_size=6",
        ),
        (
            {"pipeline_parallel_size": 2, "per_device_train_batch_size": 1},
            r"the 1f1b schedule needs at least as many pieces as stages",
        ),
        ({"pipeline_parallel_size": 2, "pipeline_schedule": "zigzag"}, r"pipeline_schedule='zigzag' is not one of"),
        ({"pipeline_parallel_size": 2, "torch_compile": True}, r"cannot be combined with training.torch_compile"),
    ],
)
def test_impossible_pipelines_are_refused_by_the_recipe(overrides, message):
    with pytest.raises(ToolkitError, match=message):
        recipe_with(**overrides)


@pytest.mark.parametrize("objective", ["rtd", "nsp", "mlm+nsp"])
def test_objectives_without_stages_are_refused_by_the_recipe(objective):
    architecture = "electra" if objective == "rtd" else "bert"
    with pytest.raises(ToolkitError, match=re.escape(f"objective '{objective}' cannot be split into pipeline stages")):
        resolve(
            PretrainRecipe,
            {"output_dir": "x", "data": {"train_files": ["x"]}, "model": {"architecture": architecture}},
            [f"objective.name={objective}", "training.pipeline_parallel_size=2"],
        )


def test_fine_tuning_and_launches_that_cannot_hold_the_pipeline_are_refused():
    from toolkit.finetuning.config import FinetuneRecipe

    with pytest.raises(ToolkitError, match="pipeline parallelism trains the pretraining objectives"):
        resolve(
            FinetuneRecipe,
            {"output_dir": "x", "model": {"model_name_or_path": "m"}, "task": {"name": "sms-spam"}},
            ["training.pipeline_parallel_size=2"],
        )
    t = recipe_with(pipeline_parallel_size=2).training
    with pytest.raises(ToolkitError, match=r"does not divide the 3 launched process"):
        pipeline.check_layout(t, 3, "ddp")
    with pytest.raises(ToolkitError, match=r"cannot be combined with deepspeed-zero2"):
        pipeline.check_layout(t, 2, "deepspeed-zero2")
    with pytest.raises(ToolkitError, match=r"cannot be combined with fsdp"):
        pipeline.check_layout(t, 4, "fsdp")
    pipeline.check_layout(t, 4, "ddp")


def test_one_process_asked_for_two_stages_stops_before_training(tmp_path, corpus_dir, wordpiece_dir):
    recipe = tiny_bert_recipe(tmp_path / "out", corpus_dir, wordpiece_dir, pipeline_parallel_size=2)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = run_cli("pretrain", str(path))
    assert proc.returncode != 0
    assert "pipeline_parallel_size=2 does not divide the 1 launched process" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()


# ---- 2 processes over gloo: PP=2 equals one process -----------------------------------------------------


def tied(folder) -> bool:
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    config = json.loads((Path(folder) / "config.json").read_text())
    auto = AutoModelForCausalLM if config["model_type"] == "gpt2" else AutoModelForMaskedLM
    model = auto.from_pretrained(str(folder))
    return model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def assert_same_run(reference: Path, split: Path, steps: int | None = None) -> None:
    ref = losses_of(reference)
    assert len(ref) == 3
    assert losses_of(split) == pytest.approx(ref[-steps:] if steps else ref, abs=1e-5)
    full, parts = weights_of(reference), weights_of(split)
    assert sorted(full) == sorted(parts)
    worst = max((full[k] - parts[k]).abs().max().item() for k in full)
    assert worst < 1e-5, worst


def pretrain_recipe(tmp_path, corpus_dir, tokenizers, objective) -> Path:
    make = tiny_gpt_recipe if objective == "clm" else tiny_bert_recipe
    tokenizer = tokenizers[1] if objective == "clm" else tokenizers[0]
    recipe = make(tmp_path / "unused", corpus_dir, tokenizer, max_steps=3, eval_on_start=False, save_steps=2)
    recipe["training"]["max_eval_batches"] = 2
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.multiproc
@pytest.mark.parametrize("objective, pieces, schedule", [("mlm", 2, "gpipe"), ("clm", 4, "1f1b")])
def test_two_stage_pipeline_equals_one_process(
    tmp_path, corpus_dir, wordpiece_dir, bpe_dir, objective, pieces, schedule
):
    """3 AdamW steps, 2 processes each holding one of the 2 layers (the first the embeddings, the second the
    head tied to them): the loss curve, the evaluation and the gathered weights of one process."""
    path = pretrain_recipe(tmp_path, corpus_dir, (wordpiece_dir, bpe_dir), objective)
    one = run_cli("pretrain", str(path), f"output_dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]
    pp = launch(
        2,
        "pretrain",
        str(path),
        f"output_dir={tmp_path / 'pp'}",
        "training.pipeline_parallel_size=2",
        f"training.pipeline_micro_batches={pieces}",
        f"training.pipeline_schedule={schedule}",
        port=29671,
    )
    assert pp.returncode == 0, pp.stderr[-3000:]
    assert f"pipeline parallel 2 stages x data parallel 1 ({schedule}, {pieces} micro-batches" in pp.stdout

    state = json.loads((tmp_path / "pp" / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())
    assert (state["world_size"], state["pipeline_parallel_size"]) == (2, 2)
    stages = tmp_path / "pp" / "checkpoints" / "checkpoint-3" / pipeline.SHARDS_DIR
    assert sorted(p.name for p in stages.iterdir()) == ["stage-0.pt", "stage-1.pt"]

    assert_same_run(tmp_path / "one", tmp_path / "pp")
    results = [json.loads((tmp_path / run / "results.json").read_text()) for run in ("one", "pp")]
    assert results[1]["eval_loss"] == pytest.approx(results[0]["eval_loss"], abs=1e-5)
    assert tied(tmp_path / "pp")  # the gathered folder loads in plain transformers, decoder tied to embeddings


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("objective, pieces, schedule", [("mlm", 4, "1f1b"), ("clm", 2, "gpipe")])
def test_pipeline_resumes_and_accumulates_like_one_process(
    tmp_path, corpus_dir, wordpiece_dir, bpe_dir, objective, pieces, schedule
):
    """The other micro-batch counts and schedules, with gradient accumulation (batch 4 x 2 steps against
    one process's batch 8), and a resume from the stages of a checkpoint."""
    path = pretrain_recipe(tmp_path, corpus_dir, (wordpiece_dir, bpe_dir), objective)
    one = run_cli("pretrain", str(path), f"output_dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]
    settings = [
        "training.pipeline_parallel_size=2",
        f"training.pipeline_micro_batches={pieces}",
        f"training.pipeline_schedule={schedule}",
        "training.per_device_train_batch_size=4",
        "training.gradient_accumulation_steps=2",
    ]
    pp = launch(2, "pretrain", str(path), f"output_dir={tmp_path / 'pp'}", *settings, port=29672)
    assert pp.returncode == 0, pp.stderr[-3000:]
    assert_same_run(tmp_path / "one", tmp_path / "pp")

    checkpoint = tmp_path / "pp" / "checkpoints" / "checkpoint-2"
    resume = [f"training.resume_from_checkpoint={checkpoint}"]
    resumed = launch(2, "pretrain", str(path), f"output_dir={tmp_path / 'resumed'}", *settings, *resume, port=29673)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step 2" in resumed.stdout
    assert_same_run(tmp_path / "one", tmp_path / "resumed", steps=1)

    # the stages of a checkpoint resume only under the same layout
    single = run_cli("pretrain", str(path), f"output_dir={tmp_path / 'single'}", *resume)
    assert single.returncode != 0
    assert "pipeline_parallel_size (2 -> 1)" in single.stderr


@pytest.mark.slow
@pytest.mark.multiproc
def test_data_parallel_copies_of_a_pipeline_equal_one_process(tmp_path, corpus_dir, wordpiece_dir, bpe_dir):
    """4 processes: 2 data-parallel copies of a 2-stage pipeline, batch 4 each, against one process's batch 8
    (gradients averaged over the copies, the tie summed within each copy)."""
    path = pretrain_recipe(tmp_path, corpus_dir, (wordpiece_dir, bpe_dir), "mlm")
    one = run_cli("pretrain", str(path), f"output_dir={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr[-3000:]
    settings = ["training.pipeline_parallel_size=2", "training.per_device_train_batch_size=4"]
    run = launch(4, "pretrain", str(path), f"output_dir={tmp_path / 'dp'}", *settings, port=29674)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "4 process(es), ddp over gloo, pipeline parallel 2 stages x data parallel 2" in run.stdout
    state = json.loads((tmp_path / "dp" / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())
    assert (state["world_size"], state["pipeline_parallel_size"]) == (4, 2)
    assert_same_run(tmp_path / "one", tmp_path / "dp")
