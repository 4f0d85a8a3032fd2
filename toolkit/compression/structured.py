"""Structured pruning: remove whole attention heads and feed-forward neurons, so the matrices shrink.

Unstructured pruning zeroes single weights and leaves every matrix its size; removing a head or a
neuron removes rows and columns, so the pruned model is smaller and faster with no sparse kernels.
The same number of heads and neurons goes from every layer so that the result is still described
by a config (`num_attention_heads`, `intermediate_size`); which ones go is decided per layer by an
importance score: first-order Taylor on a few batches (`importance_scores`) or, without data, the
weights' norms (`magnitude_scores`).

transformers derives the head size from `hidden_size / num_attention_heads`, so a model with
removed heads records `config.attention_head_size` and is saved with its model code
(`pruned_modeling.py`, see there). A model with only neurons removed is a plain transformers model.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import torch
from torch import nn

from toolkit.compression import pruned_modeling
from toolkit.compression.pruned_modeling import SUPPORTED_TYPES, attention_layers, new_linear, set_heads
from toolkit.errors import ToolkitError

__all__ = [
    "SUPPORTED_TYPES",
    "check_structured",
    "importance_scores",
    "magnitude_scores",
    "prune_structured",
    "save_pruned",
]

MODEL_FILE = "toolkit_pruned.py"

# Auto classes a pruned folder names in its auto_map, where the model type has a native class for it.
AUTO_CLASSES = {
    "AutoModel": "MODEL_MAPPING_NAMES",
    "AutoModelForPreTraining": "MODEL_FOR_PRETRAINING_MAPPING_NAMES",
    "AutoModelForMaskedLM": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "AutoModelForSequenceClassification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "AutoModelForTokenClassification": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
    "AutoModelForQuestionAnswering": "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES",
}


def check_structured(model) -> None:
    """Stop before any work when `model` is not a BERT-family encoder whose layers can be resized."""
    name, config = type(model).__name__, model.config
    if name.startswith(("MeanPooled", "Pruned")) or getattr(config, "auto_map", None):
        raise ToolkitError(
            f"{name} comes from custom model code that structured pruning cannot resize: prune the native "
            "model before saving it with custom code, or set compress.structured=false for unstructured pruning."
        )
    if config.model_type not in SUPPORTED_TYPES:
        raise ToolkitError(
            f"structured pruning supports BERT-family encoders ({', '.join(SUPPORTED_TYPES)}), not model type "
            f"'{config.model_type}': set compress.structured=false to prune single weights instead."
        )
    if getattr(config, "add_cross_attention", False):
        raise ToolkitError(
            f"structured pruning removes self-attention heads only, and this {name} also has cross-attention: "
            "set compress.structured=false to prune single weights instead."
        )


def _layers(model) -> list[nn.Module]:
    return list(model.base_model.encoder.layer)


def _num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- importance -------------------------------------------------------------------------------------


def _output_weights(model) -> list[nn.Parameter]:
    """The weights that read each unit's output: the attention output dense (columns in blocks of one
    head) and the feed-forward output dense (one column per neuron), layer by layer."""
    return [w for layer in _layers(model) for w in (layer.attention.output.dense.weight, layer.output.dense.weight)]


@contextlib.contextmanager
def _scoring(model, weights: list[nn.Parameter]):
    """Eval mode (no dropout: a deterministic estimate) with gradients on `weights`; restores both."""
    was_training = model.training
    flags = [w.requires_grad for w in weights]
    model.eval()
    for w in weights:
        w.requires_grad_(True)
    try:
        with torch.enable_grad():
            yield
    finally:
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)
        model.train(was_training)


def importance_scores(model, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """First-order Taylor importance of every head [layers, heads] and neuron [layers, intermediate].

    Removing a unit is multiplying its output by a gate g = 0 instead of 1; to first order the loss
    changes by dL/dg, which is the sum of weight * gradient over the columns of the output dense
    that read the unit (Michel et al. 2019 for heads, Molchanov et al. 2019 for neurons). The score
    of a unit is |dL/dg| per batch, summed over `batches` (dicts of tensors with `labels`, so that
    `model(**batch).loss` is defined). Gradients come from `torch.autograd.grad`, so no `.grad` is
    left behind; the model's train/eval mode and `requires_grad` flags are restored.
    """
    check_structured(model)
    config, device = model.config, model.device
    weights = _output_weights(model)
    n_layers = len(_layers(model))
    heads = torch.zeros(n_layers, config.num_attention_heads)
    neurons = torch.zeros(n_layers, config.intermediate_size)
    with _scoring(model, weights):
        for batch in batches:
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
            if loss is None:
                raise ToolkitError("importance scoring needs batches with labels: give the batches a 'labels' entry.")
            grads = torch.autograd.grad(loss, weights)
            per_column = [(w * g).sum(0).detach().float().cpu() for w, g in zip(weights, grads)]
            heads += torch.stack([c.view(config.num_attention_heads, -1).sum(1) for c in per_column[0::2]]).abs()
            neurons += torch.stack(per_column[1::2]).abs()
    return heads, neurons


def _l2(blocks: list[torch.Tensor]) -> torch.Tensor:
    """Norm of each row over several [units, ...] tensors taken together."""
    return torch.cat([b.detach().float().reshape(b.shape[0], -1) for b in blocks], dim=1).norm(dim=1)


def magnitude_scores(model) -> tuple[torch.Tensor, torch.Tensor]:
    """Data-free importance: the L2 norm of all the parameters that go with each head [layers, heads]
    (its query/key/value rows and biases, its columns of the attention output dense) and each neuron
    [layers, intermediate] (its intermediate row and bias, its column of the output dense)."""
    heads, neurons = [], []
    for layer in _layers(model):
        attention = layer.attention.self
        n = attention.num_attention_heads
        rows = [p.reshape(n, -1) for lin in (attention.query, attention.key, attention.value) for p in lin.parameters()]
        heads.append(_l2([*rows, layer.attention.output.dense.weight.T.reshape(n, -1)]))
        inter = layer.intermediate.dense
        neurons.append(_l2([inter.weight, inter.bias.reshape(-1, 1), layer.output.dense.weight.T]))
    return torch.stack(heads), torch.stack(neurons)


# ---- pruning ----------------------------------------------------------------------------------------


def _selected(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A copy of `linear` with only the output rows (dim 0) or input columns (dim 1) in `index`."""
    weight = linear.weight.detach().index_select(dim, index)
    out = new_linear(linear, weight.shape[1], weight.shape[0])
    with torch.no_grad():
        out.weight.copy_(weight)
        if linear.bias is not None:  # a bias belongs to the outputs: sliced with rows, kept with columns
            out.bias.copy_(linear.bias[index] if dim == 0 else linear.bias)
    for new, old in zip(out.parameters(), linear.parameters()):
        new.requires_grad_(old.requires_grad)
    return out


def _prune_heads(attention: nn.Module, output: nn.Module, kept: torch.Tensor) -> None:
    """Keep the heads `kept` of one layer: their blocks of query/key/value rows and output columns."""
    size = attention.attention_head_size
    index = (kept[:, None] * size + torch.arange(size)).flatten().to(output.dense.weight.device)
    q, k, v = (_selected(lin, index, 0) for lin in (attention.query, attention.key, attention.value))
    set_heads(attention, q, k, v, len(kept))
    output.dense = _selected(output.dense, index, 1)


def _prune_neurons(layer: nn.Module, kept: torch.Tensor) -> None:
    index = kept.to(layer.output.dense.weight.device)
    layer.intermediate.dense = _selected(layer.intermediate.dense, index, 0)
    layer.output.dense = _selected(layer.output.dense, index, 1)


def _kept(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` highest scores, in their original order."""
    return scores.topk(keep).indices.sort().values


def _to_keep(total: int, sparsity: float, enabled: bool) -> int:
    return max(1, total - round(sparsity * total)) if enabled else total


def prune_structured(model, sparsity: float, scores=None, *, heads: bool = True, neurons: bool = True) -> dict:
    """In place: remove round(sparsity * n) of the heads and of the feed-forward neurons of every layer
    (at least one of each stays), the lowest by `scores` ((heads, neurons) as `importance_scores`
    returns; default `magnitude_scores`). `heads=False` / `neurons=False` leave that kind alone.

    The config keeps describing the model: `num_attention_heads` and `intermediate_size` become the
    pruned sizes and `attention_head_size` records the (unchanged) head size. Returns a summary:
    heads, intermediate size and parameter count before and after, and the removed heads per layer.
    """
    check_structured(model)
    if not 0 <= sparsity < 1:
        raise ToolkitError(
            f"structured sparsity must be in [0, 1), got {sparsity}: it is the fraction of units removed."
        )
    config, layers = model.config, _layers(model)
    n_heads, n_neurons = config.num_attention_heads, config.intermediate_size
    head_scores, neuron_scores = scores if scores is not None else magnitude_scores(model)
    if head_scores.shape != (len(layers), n_heads) or neuron_scores.shape != (len(layers), n_neurons):
        raise ValueError(f"scores of shapes {head_scores.shape}, {neuron_scores.shape} do not fit this model")
    keep_heads, keep_neurons = _to_keep(n_heads, sparsity, heads), _to_keep(n_neurons, sparsity, neurons)
    head_size = attention_layers(model)[0][0].attention_head_size
    summary = {"heads_before": n_heads, "intermediate_before": n_neurons, "params_before": _num_params(model)}

    removed = []
    for layer, (attention, output), h_scores, n_scores in zip(
        layers, attention_layers(model), head_scores, neuron_scores
    ):
        kept = _kept(h_scores, keep_heads)
        removed.append(sorted(set(range(n_heads)) - set(kept.tolist())))
        if keep_heads < n_heads:
            _prune_heads(attention, output, kept)
        if keep_neurons < n_neurons:
            _prune_neurons(layer, _kept(n_scores, keep_neurons))

    config.num_attention_heads, config.intermediate_size = keep_heads, keep_neurons
    config.attention_head_size = head_size
    summary.update(
        heads_after=keep_heads, intermediate_after=keep_neurons, params_after=_num_params(model), removed_heads=removed
    )
    return summary


# ---- saving -----------------------------------------------------------------------------------------


def _heads_removed(config) -> bool:
    head_size = getattr(config, "attention_head_size", config.hidden_size // config.num_attention_heads)
    return head_size * config.num_attention_heads != config.hidden_size


def pruned_config_entries(model) -> dict:
    """The config.json entries that make a saved native model load as its pruned variant."""
    from transformers.models.auto import modeling_auto

    config = model.config
    config_cls = pruned_modeling.pruned_config_class(type(config))
    module = Path(MODEL_FILE).stem
    auto_map = {"AutoConfig": f"{module}.{config_cls.__name__}"}
    for auto_class, mapping in AUTO_CLASSES.items():
        if native := getattr(modeling_auto, mapping).get(config.model_type):
            auto_map[auto_class] = f"{module}.Pruned{native}"
    return {
        "model_type": config_cls.model_type,
        "architectures": [f"Pruned{type(model).__name__}"],
        "auto_map": auto_map,
    }


def save_pruned(model, folder) -> None:
    """`save_pretrained`, plus the model code when heads were removed (see the module docstring): with
    neurons removed only, the folder is a plain transformers model."""
    folder = Path(folder)
    model.save_pretrained(str(folder))
    if not _heads_removed(model.config):
        return
    shutil.copyfile(pruned_modeling.__file__, folder / MODEL_FILE)
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(pruned_config_entries(model))
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
