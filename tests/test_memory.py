"""Gradient checkpointing: really on (layers run again in the backward pass), and the same gradients
as without it, for full training and for LoRA adapters on a frozen model."""

from __future__ import annotations

import torch
from conftest import TINY_MODEL, tiny_bert_recipe

from toolkit.engine.memory import enable_gradient_checkpointing
from toolkit.engine.tracking import read_metrics
from toolkit.pretraining import pretrain

TOL = 1e-5  # recomputation repeats the same float operations; allow for kernel-order noise only


def tiny_bert(cls_name: str, **extra):
    import transformers

    config = transformers.BertConfig(vocab_size=200, max_position_embeddings=64, **TINY_MODEL, **extra)
    torch.manual_seed(0)
    return getattr(transformers, cls_name)(config)


def gradients(model, loss_fn) -> tuple[dict, int]:
    """Gradients of every trainable parameter, and how many times the first layer's feed-forward ran."""
    calls = []
    layer = model.get_submodule(next(n for n, _ in model.named_modules() if n.endswith("encoder.layer.0.intermediate")))
    hook = layer.register_forward_hook(lambda *a: calls.append(1))
    model.train()
    model.zero_grad(set_to_none=True)
    loss_fn(model).backward()
    hook.remove()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, len(calls)


def assert_close(got: dict, ref: dict) -> None:
    assert got.keys() == ref.keys() and ref
    for name in ref:
        assert ref[name].abs().sum() > 0, f"{name} has no gradient"
        diff = (got[name] - ref[name]).abs().max().item()
        assert diff <= TOL * max(1.0, ref[name].abs().max().item()), (name, diff)


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 200, (4, 16), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, ::3] = ids[:, ::3]
    return ids, labels


def test_gradient_checkpointing_gives_the_same_gradients_as_without():
    from toolkit.config import ObjectiveArgs
    from toolkit.objectives.mlm import MaskedLM

    objective = MaskedLM(tiny_bert("BertForMaskedLM"), ObjectiveArgs())
    ids, labels = batch()

    def loss(obj):
        return obj({"input_ids": ids, "labels": labels})[0]["mlm"]

    ref, plain_calls = gradients(objective, loss)
    assert enable_gradient_checkpointing(objective) == ["BertForMaskedLM"]
    assert objective.model.is_gradient_checkpointing
    got, checkpointed_calls = gradients(objective, loss)
    assert (plain_calls, checkpointed_calls) == (1, 2)  # recomputed in the backward pass
    assert_close(got, ref)


def test_gradient_checkpointing_under_lora_gives_the_adapters_the_same_gradients():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_bert("BertForSequenceClassification", num_labels=3),
        LoraConfig(
            task_type="SEQ_CLS",
            r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            target_modules=["query", "value"],
            init_lora_weights=False,  # B != 0, so that A has a gradient too (as after the first steps)
        ),
    )
    ids, _ = batch()
    target = torch.tensor([0, 1, 2, 1])

    def loss(m):
        return m(input_ids=ids, labels=target).loss

    ref, plain_calls = gradients(model, loss)
    assert any("lora_" in n for n in ref)
    frozen = [p for n, p in model.named_parameters() if "embeddings" in n]
    assert frozen and not any(p.requires_grad for p in frozen)  # the inputs to layer 0 need no gradient
    enable_gradient_checkpointing(model)
    got, checkpointed_calls = gradients(model, loss)
    assert (plain_calls, checkpointed_calls) == (1, 2)
    assert_close(got, ref)
    assert all(p.grad is None for p in frozen)


def test_training_with_gradient_checkpointing_follows_the_same_curve(tmp_path, corpus_dir, wordpiece_dir):
    short = dict(max_steps=3, eval_on_start=False)
    plain = pretrain(tiny_bert_recipe(tmp_path / "plain", corpus_dir, wordpiece_dir, **short))
    checkpointed = pretrain(
        tiny_bert_recipe(tmp_path / "ckpt", corpus_dir, wordpiece_dir, **short), training__gradient_checkpointing=True
    )
    assert checkpointed.model.is_gradient_checkpointing and not plain.model.is_gradient_checkpointing
    a = [m["loss"] for m in read_metrics(tmp_path / "plain") if "loss" in m]
    b = [m["loss"] for m in read_metrics(tmp_path / "ckpt") if "loss" in m]
    assert len(a) == 3 and max(abs(x - y) for x, y in zip(a, b)) < 1e-5
