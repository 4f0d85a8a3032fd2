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

import copy
import dataclasses
from pathlib import Path

from torch import nn
from torch.nn.utils import prune

from toolkit.errors import ToolkitError
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


# ---- the method: `toolkit compress` with compress.method=prune ------------------------------------


def run(recipe, out: Path):
    """Prune (unstructured or structured), save, measure; optionally recover by fine-tuning, measure again."""
    from toolkit.compression import structured
    from toolkit.compression.subject import conditions, load_input, load_model, subject_for

    c = recipe.compress
    model_dir, tokenizer, kind, auto_class = load_input(recipe)
    if c.recovery_epochs and kind != "classifier":  # from config.json alone, before any data or weights load
        raise ToolkitError(
            "compress.recovery_epochs fine-tunes on the task's labels, so it needs a classifier (a folder written by "
            f"toolkit finetune); '{recipe.model.model_name_or_path}' is a {kind}: set compress.recovery_epochs=0"
        )
    subject = subject_for(recipe, recipe.model.model_name_or_path, model_dir, kind, tokenizer)
    model = load_model(auto_class, model_dir)
    if c.structured:
        structured.check_structured(model)
    original = copy.deepcopy(model)  # measured as it is; `model` is pruned (and trained) in place
    rows = [subject.measure("original", original, model_dir, "the input model")]
    models = {"original": original}

    if c.structured:
        if c.importance_batches and kind == "classifier":
            scores = structured.importance_scores(model, importance_batches(recipe, subject))
            how = f"first-order importance over {c.importance_batches} training batches"
        else:
            scores, how = structured.magnitude_scores(model), "weight magnitude"
        summary = structured.prune_structured(model, c.sparsity, scores)
        note = (
            f"structured: heads {summary['heads_before']} -> {summary['heads_after']} and FFN neurons "
            f"{summary['intermediate_before']} -> {summary['intermediate_after']} per layer, ranked by {how}"
        )
    else:
        summary = prune_global(model, c.sparsity)
        note = (
            f"unstructured: {summary['zeros']:,} of the {summary['pruned_weights']:,} encoder Linear weights "
            f"({summary['sparsity']:.1%}) zeroed by global magnitude"
        )
    print(f"pruned: {note}")
    name = "pruned" if not c.structured else "pruned-structured"
    save_folder(out / name, model, tokenizer, c.structured)
    models[name] = permanent(model)
    rows.append(subject.measure(name, models[name], out / name, note))

    if c.recovery_epochs:
        trained = recover(recipe, model, subject, out / f"{name}-recovered")
        if trained is not None:
            recovery = f"{note}; then {c.recovery_epochs:g} epoch(s) of fine-tuning"
            if not c.structured:
                recovery += f" with the pruned weights held at zero ({sparsity_of(trained)['sparsity']:.1%} after)"
            rows.append(subject.measure(f"{name}-recovered", trained, out / f"{name}-recovered", recovery))
            models[f"{name}-recovered"] = trained
    title = f"Pruning of {recipe.model.model_name_or_path}"
    subject.time(rows)
    return title, conditions(recipe, subject, f"Sparsity {c.sparsity:g}."), rows, models


def recover(recipe, model, subject, folder: Path):
    """Fine-tune the pruned classifier on its task (the masks keep pruned weights at zero) on the run
    harness, and publish it with the masks folded in. The trained model (main process) or None."""
    from toolkit.compression.subject import train, weights
    from toolkit.finetuning.objective import SequenceClassifier

    c, data, tokenizer = recipe.compress, subject.data, subject.tokenizer
    t = dataclasses.replace(recipe.training, num_train_epochs=c.recovery_epochs, max_steps=-1)
    objective = SequenceClassifier(
        model, c, data.problem_type, tokenizer.pad_token_id, None, recipe.task.max_seq_length
    )

    def save(target: Path, objective, state_dict: dict) -> None:
        if c.structured:
            from toolkit.compression.structured import save_pruned

            save_pruned(objective.model, target)
        else:  # the gathered weights, masks folded in
            make_permanent(objective.model)
            objective.model.save_pretrained(str(target), state_dict=fold_masks(weights(state_dict)))

    return train(recipe, t, objective, data.train, data.validation, tokenizer, folder, "recovery", save)


def permanent(model):
    """The model as it is saved: a copy, with the pruning masks folded in (the original keeps them)."""
    if not any(n.endswith("_orig") for n, _ in model.named_parameters()):
        return copy.deepcopy(model)
    clone = type(model)(copy.deepcopy(model.config))  # (a model with masks attached cannot be deep-copied)
    clone.load_state_dict(fold_masks(model.state_dict()))
    return clone.eval()


def save_folder(folder: Path, model, tokenizer, structured: bool) -> None:
    """The pruned model as an ordinary folder (structured: with the model code its new shapes need)."""
    from toolkit.compression.subject import is_main
    from toolkit.engine.run import publish

    if not is_main():
        return

    def write(tmp: Path) -> None:
        if structured:
            from toolkit.compression.structured import save_pruned

            save_pruned(model, tmp)
        else:
            permanent(model).save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))

    publish(folder, write)


def importance_batches(recipe, subject):
    """Training batches with labels, for the importance estimate (a fixed, seeded sample)."""
    import torch

    from toolkit.data.examples import PaddedExamples

    data, t = subject.data, recipe.training
    examples = PaddedExamples(data.train, subject.tokenizer.pad_token_id)
    g = torch.Generator().manual_seed(t.seed)
    order = torch.randperm(len(examples), generator=g).tolist()
    size = t.per_device_train_batch_size
    for i in range(min(recipe.compress.importance_batches, len(order) // size)):
        batch = examples.__getitems__(order[i * size : (i + 1) * size])
        batch.pop("idx")
        yield batch
