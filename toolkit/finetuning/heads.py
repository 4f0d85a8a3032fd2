"""Classification heads on one vector per example, and mean pooling as an ordinary transformers model.

The frozen mode trains a model's own head on cached features: `pool()` picks the vector the
architecture's head reads (the [CLS] position of an encoder, the last non-padding token of a
decoder, as `GPT2ForSequenceClassification` does) or the masked mean of all tokens, and
`head_logits()` applies the head modules of `AutoModelForSequenceClassification` to it. With [CLS]
pooling the result is exactly the native model's forward, so the saved folder is a plain
transformers model.

The native heads cannot mean-pool, so a mean-pooled model is saved with this file beside its weights
(as `toolkit_pooling.py`): a config class with its own `model_type` and a subclass of the native
model whose forward mean-pools. `AutoModelForSequenceClassification.from_pretrained(path,
trust_remote_code=True)` loads it; without `trust_remote_code` transformers refuses (the model type
is unknown to it) rather than silently loading [CLS] pooling. This file imports only torch and
transformers so that it works without the toolkit installed.
"""

from __future__ import annotations

import torch
import transformers
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

# Architectures whose heads are known here (`type(model).__name__`). Others use full or PEFT modes.
NATIVE_CLASSES = (
    "BertForSequenceClassification",
    "DistilBertForSequenceClassification",
    "ElectraForSequenceClassification",
    "RobertaForSequenceClassification",
    "XLMRobertaForSequenceClassification",
    "GPT2ForSequenceClassification",
)


def is_decoder(model) -> bool:
    """Decoder-only classifiers (GPT-2, Llama, ...) read the last token through `score`."""
    return hasattr(model, "score")


def head_modules(model) -> list[str]:
    """Names of the modules that form the classification head, BERT's pooler included (it sits
    between the encoder and the classifier and is untrained in a masked-LM checkpoint)."""
    names = [n for n in ("pre_classifier", "classifier", "score", "qa_outputs") if hasattr(model, n)]
    base = model.base_model
    if getattr(base, "pooler", None) is not None:
        names.append(f"{model.base_model_prefix}.pooler")
    return names


def pool(model, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, pooling: str):
    """One vector per example from the last hidden states: 'cls' (what the native head reads) or 'mean'."""
    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    if is_decoder(model):  # the rightmost token that is not padding, as the native head finds it
        pad = model.config.pad_token_id
        positions = torch.arange(input_ids.shape[-1], device=input_ids.device, dtype=torch.int32)
        last = (positions * (input_ids != pad).int()).argmax(-1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return hidden[:, 0]


def head_logits(model, pooled: torch.Tensor) -> torch.Tensor:
    """The native classification head of `model` applied to one vector per example."""
    name = type(model).__name__.removeprefix("MeanPooled")
    if name == "GPT2ForSequenceClassification":
        return model.score(pooled)
    if name == "BertForSequenceClassification":
        return model.classifier(model.dropout(model.base_model.pooler(pooled[:, None])))
    if name == "DistilBertForSequenceClassification":
        return model.classifier(model.dropout(nn.functional.relu(model.pre_classifier(pooled))))
    if name in (
        "ElectraForSequenceClassification",
        "RobertaForSequenceClassification",
        "XLMRobertaForSequenceClassification",
    ):
        return model.classifier(pooled[:, None])  # these heads read position 0 of a sequence
    raise ValueError(f"no known classification head for {name}: supported are {', '.join(NATIVE_CLASSES)}")


# Per-token heads (token classification, extractive QA) whose forward after the encoder is known here:
# `classifier(dropout(hidden))` for tagging, `qa_outputs(hidden)` for spans (DistilBERT: after dropout).
TOKEN_CLASSES = tuple(
    f"{arch}For{head}"
    for head in ("TokenClassification", "QuestionAnswering")
    for arch in ("Bert", "DistilBert", "Electra", "Roberta", "XLMRoberta", "GPT2")
)


def token_head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The native per-token head of `model` applied to the encoder's last hidden states: tag logits
    (batch, tokens, labels), or span logits (batch, tokens, 2) whose last axis is (start, end)."""
    name = type(model).__name__
    if name not in TOKEN_CLASSES:
        raise ValueError(f"no known per-token head for {name}: supported are {', '.join(TOKEN_CLASSES)}")
    if name.endswith("TokenClassification"):
        return model.classifier(model.dropout(hidden))
    return model.qa_outputs(model.dropout(hidden) if name.startswith("DistilBert") else hidden)


def classification_loss(config, logits: torch.Tensor, labels: torch.Tensor | None):
    if labels is None:
        return None
    if config.problem_type == "regression":
        return nn.functional.mse_loss(logits.squeeze(-1).float(), labels.float())
    return nn.functional.cross_entropy(logits.float(), labels)


# ---- mean pooling as a model class (used when this file is loaded as remote code) ----------------


def _mean_pooled(native_name: str):
    native = getattr(transformers, native_name)
    config_native = native.config_class

    config_cls = type(
        f"MeanPooled{config_native.__name__}",
        (config_native,),
        {"model_type": f"toolkit_mean_pooled_{config_native.model_type}", "__module__": __name__},
    )

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        hidden = self.base_model(**inputs).last_hidden_state
        logits = head_logits(self, pool(self, hidden, input_ids, attention_mask, "mean"))
        return SequenceClassifierOutput(loss=classification_loss(self.config, logits, labels), logits=logits)

    model_cls = type(
        f"MeanPooled{native_name}",
        (native,),
        {"config_class": config_cls, "forward": forward, "__module__": __name__},
    )
    return config_cls, model_cls


_MEAN_POOLED: dict = {}


def mean_pooled(native_name: str) -> tuple[type, type]:
    """(config class, model class) of the mean-pooled variant of a native classifier, made once."""
    if native_name not in _MEAN_POOLED:
        _MEAN_POOLED[native_name] = _mean_pooled(native_name)
    return _MEAN_POOLED[native_name]


def __getattr__(name: str):
    """`MeanPooledBertForSequenceClassification`, `MeanPooledBertConfig`, ...: what config.json's
    auto_map names when transformers loads this file as remote code (built on first access)."""
    wanted = name.removeprefix("MeanPooled")
    if name.startswith("MeanPooled"):
        if wanted in NATIVE_CLASSES:
            return mean_pooled(wanted)[1]
        for native in NATIVE_CLASSES:
            if getattr(transformers, native).config_class.__name__ == wanted:
                return mean_pooled(native)[0]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def mean_pooled_config(config, native_name: str) -> dict:
    """The config.json entries that turn a saved native model into its mean-pooled variant."""
    config_cls, model_cls = mean_pooled(native_name)
    module = "toolkit_pooling"
    return {
        "model_type": config_cls.model_type,
        "architectures": [model_cls.__name__],
        "auto_map": {
            "AutoConfig": f"{module}.{config_cls.__name__}",
            "AutoModelForSequenceClassification": f"{module}.{model_cls.__name__}",
        },
    }
