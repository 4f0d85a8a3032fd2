"""Optimizer and learning-rate schedule.

`training.optimizer` picks the algorithm; each comes from a maintained implementation:

| name         | implementation                               | notes                                        |
| ------------ | -------------------------------------------- | -------------------------------------------- |
| `adamw`      | `torch.optim.AdamW`, fused kernel            | the default                                  |
| `lamb`       | `pytorch_optimizer.Lamb` (You et al., 2019)  | layer-wise trust ratio for large batches     |
| `adamw_8bit` | `bitsandbytes.optim.AdamW8bit`               | 8-bit optimizer states: ~75% less state memory |

Gradients are clipped once, by the engine (`training.max_grad_norm`, or DeepSpeed's
`gradient_clipping` filled from it). `pytorch_optimizer.Lamb` does not clip internally (its
`pre_norm` scaling stays off, and its clamp of 10 bounds the weight norm in the trust ratio, not
the gradient); NVIDIA's and DeepSpeed's fused LAMB can (`max_grad_norm`), so a DeepSpeed file that
asks for that is refused.

LAMB is configured as in the paper (and as `torch_optimizer.Lamb`, which it replaced): weight
decay is part of the update whose norm sets the trust ratio, and each step moves a tensor by
`lr * min(||w||, 10)`, without the extra 1 / (1 - beta1^t) step size that the library applies by
default (ten times the step at step 1).

When a DeepSpeed config has an `optimizer` section, DeepSpeed builds that optimizer (its fused or
CPU kernels) and the toolkit hands it a placeholder (`accelerate.utils.DummyOptim`); the section
must name the same algorithm as `training.optimizer`.
"""

from __future__ import annotations

import torch
from torch import nn

from toolkit.errors import ToolkitError

OPTIMIZERS = ("adamw", "lamb", "adamw_8bit")
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


def make_optimizer(model: nn.Module, t, device: torch.device, deepspeed_config: dict | None = None):
    if hasattr(model, "optimizer_groups"):  # an objective may shape them (layer-wise learning rates)
        groups = model.optimizer_groups(t.weight_decay)
    else:
        groups = param_groups(model, t.weight_decay)
    groups = [g for g in groups if g["params"]]
    for group in groups:  # a group's `lr_scale` multiplies the learning rate (the schedule applies to all)
        group["lr"] = t.learning_rate * group.pop("lr_scale", 1.0)
    betas = (t.adam_beta1, t.adam_beta2)
    if deepspeed_config is not None and "optimizer" in deepspeed_config:
        from accelerate.utils import DummyOptim

        return DummyOptim(groups, lr=t.learning_rate, weight_decay=t.weight_decay)
    if t.optimizer == "lamb":
        from pytorch_optimizer import Lamb

        # weight_decouple=False: decay inside the trust-ratio update; adam_debias=True: step size = lr
        return Lamb(
            groups, lr=t.learning_rate, betas=betas, eps=t.adam_epsilon, weight_decouple=False, adam_debias=True
        )
    if t.optimizer == "adamw_8bit":
        check_8bit_support(device)
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=t.learning_rate, betas=betas, eps=t.adam_epsilon)
    # The fused kernel is several times faster than the per-tensor loop, on CPU as on GPU.
    fused = device.type in ("cuda", "cpu", "xpu")
    return torch.optim.AdamW(groups, lr=t.learning_rate, betas=betas, eps=t.adam_epsilon, fused=fused)


def check_8bit_support(device: torch.device) -> None:
    """bitsandbytes runs its 8-bit optimizers only on some devices: try one step before training."""
    hint = "use training.optimizer=adamw (or lamb)"
    try:
        import bitsandbytes as bnb
    except Exception as e:  # not installed, or no binary for this platform
        raise ToolkitError(
            f"training.optimizer=adamw_8bit needs bitsandbytes, which cannot load here ({e}): {hint}"
        ) from None
    probe = torch.nn.Parameter(torch.zeros(4096, device=device))  # large enough for 8-bit states
    probe.grad = torch.ones_like(probe)
    try:
        bnb.optim.AdamW8bit([probe], lr=1e-3).step()
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ToolkitError(
            f"training.optimizer=adamw_8bit: bitsandbytes cannot run its 8-bit AdamW on this {device.type} device "
            f"({first}): {hint}"
        ) from None


def innermost_optimizer(optimizer):
    """The optimizer that does the update, under accelerate's and DeepSpeed's wrappers."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def optimizer_name(optimizer) -> str:
    cls = type(innermost_optimizer(optimizer))
    return f"{cls.__module__}.{cls.__qualname__}"


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
