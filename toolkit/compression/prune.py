"""Global unstructured magnitude pruning with `torch.nn.utils.prune`, made permanent before saving.

The weights pruned are those of every `nn.Linear` inside the encoder (attention projections and
feed-forward layers): they hold almost all of the compute. Embeddings and the classification head
are left whole. The smallest-magnitude weights across all of them together are set to zero, so
layers that matter less lose more: exactly `round(sparsity * n)` of the `n` weights are pruned.

During recovery fine-tuning the masks stay attached (PyTorch's forward pre-hook multiplies each
weight by its mask), so the pruned weights stay zero while the others train. `make_permanent`
folds the masks into the weights and removes them: the saved folder holds ordinary tensors (no
`*_orig`, no `*_mask`) and loads in plain transformers.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import prune

from toolkit.finetuning.heads import head_modules


def prunable_weights(model) -> list[tuple[nn.Module, str]]:
    """(module, "weight") of every Linear in the model except its embeddings and classification head."""
    head = tuple(f"{name}." for name in head_modules(model)) if hasattr(model, "base_model") else ()
    skip = head + tuple(f"{name}." for name in ("lm_head", "cls", "generator_lm_head", "generator_predictions"))
    return [
        (module, "weight")
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not f"{name}.".startswith(skip)
    ]


def prune_global(model, sparsity: float) -> dict:
    """Zero the `sparsity` share of the prunable weights with the smallest magnitude (masks attached)."""
    targets = prunable_weights(model)
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=sparsity)
    return sparsity_of(model)


def sparsity_of(model) -> dict:
    """Zeros among the prunable weights (as the forward pass sees them, masks applied)."""
    total = zeros = 0
    for module, name in prunable_weights(model):
        weight = getattr(module, name)
        total += weight.numel()
        zeros += int((weight == 0).sum())
    return {"pruned_weights": total, "zeros": zeros, "sparsity": zeros / max(total, 1)}


def make_permanent(model) -> None:
    """Fold every pruning mask into its weight and remove the mask and the `*_orig` parameter."""
    for module in model.modules():
        for name in list(getattr(module, "_forward_pre_hooks", {}).values()):
            if isinstance(name, prune.BasePruningMethod):
                prune.remove(module, name._tensor_name)


def fold_masks(state_dict: dict) -> dict:
    """A state dict taken while masks are attached, with each `X_orig` * `X_mask` pair as `X`."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith("_mask"):
            continue
        if key.endswith("_orig"):
            base = key[: -len("_orig")]
            out[base] = value * state_dict[f"{base}_mask"].to(value.dtype)
        else:
            out[key] = value
    return out
