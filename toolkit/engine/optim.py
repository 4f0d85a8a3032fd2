"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import torch
from torch import nn

OPTIMIZERS = ("adamw",)
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (linear layers, embeddings); none on biases and norm weights.
    Tied parameters (BERT's decoder and word embeddings) appear once."""
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, t, device: torch.device) -> torch.optim.Optimizer:
    if hasattr(model, "optimizer_groups"):  # an objective may shape them (layer-wise learning rates)
        groups = model.optimizer_groups(t.weight_decay)
    else:
        groups = param_groups(model, t.weight_decay)
    for group in groups:  # a group's `lr_scale` multiplies the learning rate (the schedule applies to all)
        group["lr"] = t.learning_rate * group.pop("lr_scale", 1.0)
    # The fused kernel is several times faster than the per-tensor loop, on CPU as on GPU.
    fused = device.type in ("cuda", "cpu", "xpu")
    return torch.optim.AdamW(
        groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon, fused=fused
    )


def warmup_steps(t, total_steps: int) -> int:
    return t.warmup_steps if t.warmup_steps > 0 else int(round(t.warmup_ratio * total_steps))


def make_scheduler(optimizer, t, total_steps: int):
    from transformers import get_scheduler

    return get_scheduler(
        t.lr_scheduler_type,
        optimizer,
        num_warmup_steps=warmup_steps(t, total_steps),
        num_training_steps=total_steps,
    )
