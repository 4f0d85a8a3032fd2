"""Skipped steps: a nan/inf loss skips the step without touching the weights, the optimizer state or
the schedule, and K of them in a row stop the run; steps the fp16 loss scaler skips are counted
and do not advance the schedule; trainable weights are fp32 under mixed precision."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert_recipe
from inject_nonfinite import NonFiniteMaskedLM

from toolkit.engine.checkpoint import complete_checkpoints, read_state
from toolkit.engine.precision import SkippedSteps, upcast_trainable_params
from toolkit.engine.tracking import read_metrics
from toolkit.errors import ToolkitError
from toolkit.objectives import OBJECTIVES
from toolkit.pretraining import pretrain

# warmup over 4 steps, then constant: the learning rate says how many times the schedule advanced
SCHEDULE = {"lr_scheduler_type": "constant_with_warmup", "warmup_steps": 4, "eval_on_start": False}


def run(tmp_path, name, corpus_dir, wordpiece_dir, monkeypatch, nan_steps=(), **training):
    monkeypatch.setattr(NonFiniteMaskedLM, "nan_steps", frozenset(nan_steps))
    monkeypatch.setitem(OBJECTIVES, "mlm", NonFiniteMaskedLM)
    recipe = tiny_bert_recipe(tmp_path / name, corpus_dir, wordpiece_dir, **{**SCHEDULE, **training})
    return pretrain(recipe)


def test_nonfinite_loss_skips_the_step_without_touching_weights_or_schedule(
    tmp_path, corpus_dir, wordpiece_dir, monkeypatch
):
    skipped = run(tmp_path, "skipped", corpus_dir, wordpiece_dir, monkeypatch, nan_steps=[3], max_steps=3)
    clean = run(tmp_path, "clean", corpus_dir, wordpiece_dir, monkeypatch, max_steps=2)

    # weights after 2 good steps and a skipped one == weights after the 2 good steps
    a, b = skipped.model.state_dict(), clean.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # ... and so is the optimizer state (moments and step counts)
    opt_a = torch.load(complete_checkpoints(tmp_path / "skipped")[-1][1] / "optimizer.bin", weights_only=False)
    opt_b = torch.load(complete_checkpoints(tmp_path / "clean")[-1][1] / "optimizer.bin", weights_only=False)
    assert len(opt_a["state"]) == len(opt_b["state"]) > 0
    for pa, pb in zip(opt_a["state"].values(), opt_b["state"].values()):
        assert all(torch.equal(torch.as_tensor(pa[k]), torch.as_tensor(pb[k])) for k in pa)

    logged = {m["step"]: m for m in read_metrics(tmp_path / "skipped") if "loss" in m}
    assert logged[3]["loss"] == "nan" and logged[3]["skipped_nonfinite"] == 1
    lr = 2e-3  # the recipe's peak
    assert [logged[s]["learning_rate"] for s in (1, 2, 3)] == pytest.approx([lr / 4, lr / 2, lr / 2])
    assert skipped.metrics["skipped_nonfinite_steps"] == 1 and clean.metrics["skipped_nonfinite_steps"] == 0
    state = read_state(complete_checkpoints(tmp_path / "skipped")[-1][1])
    assert state["skipped_steps"] == {"nonfinite": 1, "loss_scaler": 0, "nonfinite_in_a_row": 1}


def test_k_nonfinite_steps_in_a_row_stop_the_run(tmp_path, corpus_dir, wordpiece_dir, monkeypatch):
    # step 2 bad, 3 good (resets the count), 4 and 5 bad: the second in a row stops at step 5
    with pytest.raises(
        ToolkitError, match=r"stopped at step 5: the loss was not finite .* for 2 optimizer steps in a row"
    ) as e:
        run(
            tmp_path,
            "diverged",
            corpus_dir,
            wordpiece_dir,
            monkeypatch,
            nan_steps=[2, 4, 5, 6],
            max_steps=8,
            max_consecutive_nonfinite_steps=2,
        )
    assert "the weights are those after step 3" in str(e.value)
    assert max(m["step"] for m in read_metrics(tmp_path / "diverged")) == 4  # nothing logged past the stop


def test_loss_scaler_skips_are_counted_and_hold_the_schedule(tmp_path, corpus_dir, wordpiece_dir, monkeypatch):
    """Bookkeeping only, on CPU: accelerate's `optimizer_step_was_skipped` (what the fp16 GradScaler and
    DeepSpeed's loss scaler report) is faked to say 'skipped' at step 2; the real overflow is a GPU check."""
    from accelerate import Accelerator

    reads = []

    def skipped(self):
        reads.append(1)
        return len(reads) == 2

    monkeypatch.setattr(Accelerator, "optimizer_step_was_skipped", property(skipped))
    result = run(tmp_path, "scaler", corpus_dir, wordpiece_dir, monkeypatch, max_steps=3)
    logged = {m["step"]: m for m in read_metrics(tmp_path / "scaler") if "loss" in m}
    assert logged[2]["skipped_by_scaler"] == 1 and "skipped_by_scaler" not in logged[3]
    lr = 2e-3
    assert [logged[s]["learning_rate"] for s in (1, 2, 3)] == pytest.approx([lr / 4, lr / 4, lr / 2])
    assert result.metrics["skipped_loss_scaler_steps"] == 1 and result.metrics["skipped_nonfinite_steps"] == 0


def test_skipped_steps_bookkeeping():
    s = SkippedSteps(patience=3)
    assert s.record(1, nonfinite_loss=False, scaler_skipped=False)
    assert not s.record(2, nonfinite_loss=False, scaler_skipped=True)
    assert not s.record(3, nonfinite_loss=True, scaler_skipped=False)
    assert not s.record(4, nonfinite_loss=True, scaler_skipped=False)
    assert s.record(5, nonfinite_loss=False, scaler_skipped=False)  # a good step resets the run of bad ones
    assert s.state() == {"nonfinite": 2, "loss_scaler": 1, "nonfinite_in_a_row": 0}
    restored = SkippedSteps(patience=3)
    restored.restore({"nonfinite": 2, "loss_scaler": 1, "nonfinite_in_a_row": 2})
    with pytest.raises(ToolkitError, match="3 optimizer steps in a row"):
        restored.record(6, nonfinite_loss=True, scaler_skipped=False)


def test_trainable_weights_are_fp32_under_mixed_precision():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)).to(torch.bfloat16)
    model[0].requires_grad_(False)  # frozen, as a PEFT base model
    assert upcast_trainable_params(model, "no") == 0 and model[1].weight.dtype == torch.bfloat16
    assert upcast_trainable_params(model, "bf16") == 2
    assert model[1].weight.dtype == torch.float32 and model[1].bias.dtype == torch.float32
    assert model[0].weight.dtype == torch.bfloat16  # frozen weights keep their dtype
