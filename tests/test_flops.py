"""Compute accounting: each objective's analytic FLOPs against torch's FLOP counter on a real forward
and backward, the peak table and meter, and the `training.max_flops` budget (stop, schedule, resume)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import tiny_bert_recipe

import toolkit
from toolkit.engine import flops
from toolkit.engine.tracking import read_metrics
from toolkit.errors import ToolkitError

VOCAB, HIDDEN, SEQ, BATCH = 500, 64, 32, 4
BERT = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=4 * HIDDEN,
    max_position_embeddings=64,
)


def _measured(objective, batch) -> int:
    """Matmul FLOPs of one training forward and backward, as torch counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        losses, _ = objective(batch)
        sum(losses.values()).backward()
    return counter.get_total_flops()


def _eager(cls, config):
    # torch's counter sees the matmuls of eager attention; the CPU SDPA kernel it does not count
    return cls._from_config(config, attn_implementation="eager")


def _masked_batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (BATCH, SEQ), generator=g)
    selected = torch.rand(ids.shape, generator=g) < 0.15
    return {"input_ids": torch.where(selected, 4, ids), "labels": torch.where(selected, ids, -100), "original": ids}


def _pretraining_case(name: str):
    import transformers as T

    from toolkit.config import ObjectiveArgs
    from toolkit.objectives import OBJECTIVES
    from toolkit.objectives.electra import generator_config

    masked = _masked_batch()
    args = ObjectiveArgs(name=name)
    if name == "mlm":
        model = _eager(T.BertForMaskedLM, T.BertConfig(**BERT))
        return OBJECTIVES[name](model, args), {k: masked[k] for k in ("input_ids", "labels")}
    if name in ("mlm+nsp", "nsp"):
        attention = torch.ones(BATCH, SEQ, dtype=torch.long)
        attention[0, 20:] = 0  # a padded pair: the encoder still runs on every position
        batch = {
            "input_ids": masked["input_ids"],
            "attention_mask": attention,
            "token_type_ids": (torch.arange(SEQ) >= SEQ // 2).long().expand(BATCH, SEQ),
            "next_sentence_label": torch.tensor([0, 1, 0, 1]),
        }
        if name == "mlm+nsp":
            batch["labels"] = masked["labels"]
        return OBJECTIVES[name](_eager(T.BertForPreTraining, T.BertConfig(**BERT)), args), batch
    if name == "rtd":
        config = T.ElectraConfig(embedding_size=HIDDEN, **BERT)
        generator = _eager(T.ElectraForMaskedLM, generator_config(config, 0.5))
        objective = OBJECTIVES[name](_eager(T.ElectraForPreTraining, config), args, generator=generator)
        batch = {
            "input_ids": masked["input_ids"],
            "labels": masked["labels"],
            "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long),
            "sample_seed": torch.arange(BATCH),
        }
        return objective, batch
    config = T.GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    ids = masked["original"]
    return OBJECTIVES[name](_eager(T.GPT2LMHeadModel, config), args), {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("name", ["mlm", "mlm+nsp", "nsp", "rtd", "clm"])
def test_analytic_flops_match_torch_flop_counter(name):
    objective, batch = _pretraining_case(name)
    analytic, measured = objective.flops(batch), _measured(objective, batch)
    # the analytic count and torch's both count matmuls only: they agree to the FLOP here (10% allowed)
    assert analytic == pytest.approx(measured, rel=0.10)
    assert analytic == pytest.approx(measured, rel=1e-3)


def test_mlm_counts_the_vocabulary_projection_only_at_masked_positions():
    objective, batch = _pretraining_case("mlm")
    more = dict(batch, labels=batch["input_ids"].clone())  # every position predicted
    head = HIDDEN * HIDDEN + HIDDEN * VOCAB  # transform + vocabulary projection
    extra = BATCH * SEQ - int((batch["labels"] != -100).sum())
    assert objective.flops(more) - objective.flops(batch) == 6 * head * extra


def _classifier_case(mode: str):
    import peft
    import transformers as T

    from toolkit.finetuning.config import FinetuneArgs
    from toolkit.finetuning.objective import SequenceClassifier

    model = _eager(T.BertForSequenceClassification, T.BertConfig(num_labels=2, **BERT))
    if mode == "lora":
        lora = peft.LoraConfig(
            task_type=peft.TaskType.SEQ_CLS, r=8, target_modules=["query", "value"], modules_to_save=["classifier"]
        )
        model = peft.get_peft_model(model, lora)
    elif mode == "prompt":
        model = peft.get_peft_model(
            model, peft.PromptTuningConfig(task_type=peft.TaskType.SEQ_CLS, num_virtual_tokens=8)
        )
    objective = SequenceClassifier(
        model, FinetuneArgs(mode=mode, num_virtual_tokens=8), "single_label_classification", pad_id=0
    )
    ids = _masked_batch()["original"]
    mask = torch.ones_like(ids)
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return objective, {**batch, "labels": torch.tensor([0, 1, 0, 1])}


@pytest.mark.parametrize("mode", ["full", "lora", "prompt"])
def test_classifier_flops_match_torch_flop_counter(mode):
    objective, batch = _classifier_case(mode)
    analytic, measured = objective.flops(batch), _measured(objective, batch)
    # LoRA: the frozen query/key/value of the first layer are counted 4x but run forward only (2x)
    assert analytic == pytest.approx(measured, rel=0.10 if mode == "lora" else 1e-3)
    assert analytic >= measured


@pytest.mark.parametrize("kind", ["classification", "mlm"])
def test_distillation_flops_add_the_teachers_forward(kind):
    import transformers as T

    from toolkit.compression.config import CompressArgs
    from toolkit.compression.distill import ClassificationDistiller, MaskedLMDistiller
    from toolkit.config import ObjectiveArgs

    small = dict(BERT, num_hidden_layers=1)
    masked = _masked_batch()
    if kind == "classification":
        student = _eager(T.BertForSequenceClassification, T.BertConfig(num_labels=2, **small))
        teacher = _eager(T.BertForSequenceClassification, T.BertConfig(num_labels=2, **BERT))
        objective = ClassificationDistiller(student, teacher, CompressArgs(), "single_label_classification", 0)
        ids = masked["original"]
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([0, 1, 0, 1])}
    else:
        student = _eager(T.BertForMaskedLM, T.BertConfig(**small))
        teacher = _eager(T.BertForMaskedLM, T.BertConfig(**BERT))
        objective = MaskedLMDistiller(student, teacher, ObjectiveArgs(), CompressArgs())
        batch = {k: masked[k] for k in ("input_ids", "labels")}
    assert objective.flops(batch) == pytest.approx(_measured(objective, batch), rel=1e-3)


def test_bert_base_flops_per_token_match_the_readme_sizing():
    import transformers as T

    from toolkit.config import ObjectiveArgs
    from toolkit.objectives.mlm import MaskedLM

    with torch.device("meta"):  # shapes only: nothing is allocated
        model = T.BertForMaskedLM(T.BertConfig())
    labels = torch.full((100, 128), -100)
    labels.view(-1)[:1920] = 1  # 15% of 12,800 positions
    per_token = MaskedLM(model, ObjectiveArgs()).flops({"input_ids": torch.zeros(100, 128), "labels": labels}) / 12_800
    assert per_token / 1e9 == pytest.approx(0.545, abs=0.001)  # README: 0.545 GFLOP per token at sequence 128


def test_peak_table_meter_and_cpu_probe():
    assert flops.gpu_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.gpu_peak("NVIDIA H100 PCIe") == 756e12
    assert flops.gpu_peak("NVIDIA H200") == 989e12
    assert flops.gpu_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert flops.gpu_peak("NVIDIA L4") == 121e12
    assert flops.gpu_peak("NVIDIA L40S") == 362e12
    assert flops.gpu_peak("NVIDIA A10G") is None  # not in the table: training.peak_flops then
    assert flops.device_peak(torch.device("cpu"), 5e9) == (5e9, "training.peak_flops")

    flops.measured_cpu_peak.cache_clear()
    rng = torch.get_rng_state()
    peak, source = flops.device_peak(torch.device("cpu"))
    assert source == "fp32 matmul probe"
    assert torch.equal(torch.get_rng_state(), rng)  # dropout's RNG untouched (a resume measures after restoring it)
    assert 1e8 < peak < 1e14
    assert flops.device_peak(torch.device("cpu"))[0] == peak  # measured once per process

    meter = flops.FlopMeter(peak=1e9, devices=2, total=10.0)
    meter.add(3e9, 1.0)
    meter.add(1e9, 1.0)
    assert meter.interval() == {"step_flops": 2e9, "train_flops": 10.0 + 4e9, "mfu": 4e9 / 2.0 / 2e9}
    assert meter.interval()["step_flops"] == 0.0  # the interval starts again; the total stays
    assert flops.schedule_steps(10.0, 3.0) == 4 and flops.schedule_steps(1.0, 3.0) == 1


def test_max_flops_and_peak_flops_are_checked():
    from toolkit.config import TrainingArgs

    for bad, message in [
        (dict(max_flops=0.0), "max_flops must be positive"),
        (dict(max_flops=1e12, max_steps=10), "keep one"),
        (dict(peak_flops=-1.0), "peak_flops must be positive"),
    ]:
        with pytest.raises(ToolkitError, match=message):
            TrainingArgs(report_to=[], **bad).validate()
    TrainingArgs(report_to=[], max_flops=1e12, num_train_epochs=0.0).validate()  # the budget alone sets the length


def _train_rows(output_dir) -> list[dict]:
    return [r for r in read_metrics(output_dir) if "loss" in r]


def test_max_flops_stops_at_the_budget_and_resumes_to_the_same_count(tmp_path, corpus_dir, wordpiece_dir):
    probe = tiny_bert_recipe(tmp_path / "probe", corpus_dir, wordpiece_dir, max_steps=2, eval_on_start=False)
    step_flops = [r["step_flops"] for r in _train_rows(toolkit.pretrain(probe).output_dir)]
    budget = 5.5 * sum(step_flops) / len(step_flops)

    training = dict(max_steps=-1, max_flops=budget, save_steps=2, save_total_limit=5, eval_on_start=False)
    recipe = tiny_bert_recipe(tmp_path / "budget", corpus_dir, wordpiece_dir, **training)
    full = toolkit.pretrain(recipe)
    rows = _train_rows(full.output_dir)
    assert full.metrics["steps"] == len(rows) == 6
    assert rows[-2]["train_flops"] < budget <= rows[-1]["train_flops"]
    assert rows[-1]["train_flops"] == pytest.approx(sum(r["step_flops"] for r in rows), rel=1e-12)
    assert rows[-1]["learning_rate"] == 0.0  # the linear schedule was sized to end at the budget
    assert all(r["mfu"] > 0 for r in rows)
    state = json.loads((full.output_dir / "checkpoints" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["train_flops"] == rows[-1]["train_flops"]

    # a crash after the step-4 checkpoint: the resumed run ends at the same step with the same count
    shutil.rmtree(full.output_dir / "checkpoints" / "checkpoint-6")
    (full.output_dir / "model.safetensors").unlink()
    resumed = toolkit.pretrain(recipe, training__resume_from_checkpoint="auto")
    again = _train_rows(resumed.output_dir)
    assert resumed.metrics["steps"] == 6
    assert [r["train_flops"] for r in again] == [r["train_flops"] for r in rows]
    assert [r["loss"] for r in again] == pytest.approx([r["loss"] for r in rows], abs=1e-6)
