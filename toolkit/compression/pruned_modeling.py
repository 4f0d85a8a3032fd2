"""BERT-family encoders with fewer attention heads than `hidden_size / head size`, as transformers models.

Structured pruning (`structured.py`) removes whole heads from every layer. transformers 5 no longer
knows pruned heads: its self-attention derives the head size from `hidden_size /
num_attention_heads`, so 2 heads of 16 in a 64-wide model would be read back as 2 heads of 32.
A model with removed heads is therefore saved with this file beside its weights (as
`toolkit_pruned.py`): a config class with its own `model_type` and, for each native class, a
subclass whose attention layers have `config.num_attention_heads` heads of
`config.attention_head_size`. `AutoModel*.from_pretrained(path, trust_remote_code=True)` loads it;
without `trust_remote_code` transformers refuses (the model type is unknown to it) rather than
loading weights into the wrong shapes. This file imports only torch and transformers so that it
works without the toolkit installed.
"""

from __future__ import annotations

import transformers
from torch import nn

# BERT-family encoders (`config.model_type`): the same layer layout, query/key/value + output dense.
SUPPORTED_TYPES = ("bert", "electra", "roberta", "xlm-roberta", "camembert")


def attention_layers(model) -> list[tuple[nn.Module, nn.Module]]:
    """(self-attention, its output module holding `dense`) of every encoder layer."""
    return [(layer.attention.self, layer.attention.output) for layer in model.base_model.encoder.layer]


def set_heads(attention: nn.Module, query: nn.Linear, key: nn.Linear, value: nn.Linear, num_heads: int) -> None:
    """Give a self-attention module new projections and the head count that goes with them. The head
    size and so `scaling` (head size ** -0.5) stay as they are: only the number of heads changes."""
    attention.query, attention.key, attention.value = query, key, value
    attention.num_attention_heads = num_heads
    attention.all_head_size = num_heads * attention.attention_head_size


def new_linear(like: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    """An `nn.Linear` of a new shape, on the device and with the dtype and bias of `like`."""
    weight = like.weight
    return nn.Linear(in_features, out_features, bias=like.bias is not None, device=weight.device, dtype=weight.dtype)


def resize_attention(model, num_heads: int) -> None:
    """Shape every attention layer for `num_heads` heads (from_pretrained then loads the weights)."""
    for attention, output in attention_layers(model):
        width = num_heads * attention.attention_head_size
        q, k, v = (new_linear(p, p.in_features, width) for p in (attention.query, attention.key, attention.value))
        set_heads(attention, q, k, v, num_heads)
        output.dense = new_linear(output.dense, width, output.dense.out_features)


# ---- the pruned classes (used when this file is loaded as remote code) ----------------------------


_CONFIGS: dict = {}
_MODELS: dict = {}


def pruned_config_class(config_native: type) -> type:
    """The native config class under its own `model_type`, made once per model type."""
    if config_native.model_type not in _CONFIGS:
        _CONFIGS[config_native.model_type] = type(
            f"Pruned{config_native.__name__}",
            (config_native,),
            {"model_type": f"toolkit_pruned_{config_native.model_type}", "__module__": __name__},
        )
    return _CONFIGS[config_native.model_type]


def pruned_model_class(native_name: str) -> type:
    """The subclass of a native model class whose attention has the pruned shapes, made once."""
    if native_name not in _MODELS:
        native = getattr(transformers, native_name)

        def __init__(self, config, *args, **kwargs):
            # The native layers insist that the heads divide hidden_size: build them at the unpruned
            # head count (same head size), then resize to the pruned one.
            num_heads = config.num_attention_heads
            config.num_attention_heads = config.hidden_size // config.attention_head_size
            try:
                native.__init__(self, config, *args, **kwargs)
            finally:
                config.num_attention_heads = num_heads
            resize_attention(self, num_heads)
            self.init_weights()  # initialises only the new layers (the others are marked initialised)

        _MODELS[native_name] = type(
            f"Pruned{native_name}",
            (native,),
            {"config_class": pruned_config_class(native.config_class), "__init__": __init__, "__module__": __name__},
        )
    return _MODELS[native_name]


def _native_config_class(name: str) -> type | None:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return next((CONFIG_MAPPING[t] for t in SUPPORTED_TYPES if CONFIG_MAPPING[t].__name__ == name), None)


def _native_model_class(name: str) -> type | None:
    cls = getattr(transformers, name, None)
    config_cls = getattr(cls, "config_class", None)
    return cls if getattr(config_cls, "model_type", None) in SUPPORTED_TYPES else None


def __getattr__(name: str):
    """`PrunedBertForSequenceClassification`, `PrunedBertConfig`, ...: what config.json's auto_map
    names when transformers loads this file as remote code (built on first access)."""
    wanted = name.removeprefix("Pruned")
    if name.startswith("Pruned"):
        if _native_model_class(wanted) is not None:
            return pruned_model_class(wanted)
        if (config_native := _native_config_class(wanted)) is not None:
            return pruned_config_class(config_native)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
