"""Sequence classification and regression as objectives of the shared training engine.

`SequenceClassifier` runs the whole model (full and PEFT modes) on dynamically padded batches;
`FrozenHead` runs only the head on features the frozen encoder produced once (`features.py`).
Both return summed losses (the engine normalises by the global count of examples in the optimizer
step) and, in eval mode, per-example logits and labels as `example/*` stats, which the engine
gathers from every process for the metrics that need all predictions (F1, MCC, correlations).
"""

from __future__ import annotations

import functools
import re

import torch
import torch.nn.functional as F

from toolkit.data.examples import PaddedExamples, Passthrough
from toolkit.engine import flops
from toolkit.finetuning import metrics as task_metrics
from toolkit.finetuning.heads import head_logits
from toolkit.objectives.base import Objective


class SequenceClassifier(Objective):
    name = "sequence-classification"
    architectures = ()
    auto_class = "AutoModelForSequenceClassification"
    loss_weights = {"task": 1.0}

    def __init__(self, model, args, problem_type: str, pad_id: int, pad_to: int | None = None, max_len: int = 0):
        super().__init__(model, args)
        self.problem_type, self.pad_id, self.pad_to, self.max_len = problem_type, pad_id, pad_to, max_len

    # ---- data -----------------------------------------------------------------------------------
    def make_dataset(self, hf_dataset, split: str = "train"):
        return PaddedExamples(hf_dataset, self.pad_id, self.pad_to, longest_first=split != "train")

    def make_collator(self, tokenizer, seed: int, salt: str = "train"):
        return Passthrough()

    def describe_example(self, data) -> str:
        return f"examples of up to {self.max_len} tokens"

    def num_tokens(self, batch: dict) -> int:
        return int(batch["attention_mask"].sum())

    # ---- the step -------------------------------------------------------------------------------
    @functools.cached_property
    def flop_shapes(self) -> tuple[flops.Stack, int, int]:
        """(encoder stack, trained head weights, frozen head weights). The head (pooler, classifier,
        score) runs once per sequence. Left out: PEFT's inactive copy of the head (`original_module`)
        and P-tuning's prompt encoder (a small network run on the virtual tokens only)."""
        copies = ("original_module", "prompt_encoder")
        body = flops.stack_of(self.model, skip=HEAD_MODULES + copies)
        head = flops.matmul_weights(self.model, copies, trained=True) - body.trained
        return body, head, flops.matmul_weights(self.model, copies, trained=False) - body.frozen

    def flops(self, batch):
        """Frozen base weights (PEFT modes) count 4x: gradients flow through them to the adapters or
        the prompt below (the layers under the lowest adapter run forward only: a small overcount).
        Prompt tuning and P-tuning lengthen every sequence by the virtual tokens; prefix tuning adds
        them as attention keys only."""
        body, head, frozen_head = self.flop_shapes
        sequences, length, _ = flops.batch_shape(batch)
        mode = getattr(self.args, "mode", "full")
        virtual = getattr(self.args, "num_virtual_tokens", 0)
        keys = None
        if mode in ("prompt", "ptuning"):
            length += virtual
        elif mode == "prefix":
            keys = length + virtual
        return flops.sequence_classification(body, head, sequences, length, keys, frozen_head)

    def logits(self, batch: dict) -> torch.Tensor:
        inputs = {k: batch[k] for k in PaddedExamples.COLUMNS if k in batch}
        return self.model(**inputs).logits

    def counts(self, batch):
        return {"task": batch["labels"].new_tensor(batch["labels"].shape[0], dtype=torch.long)}

    def forward(self, batch):
        return self.score(self.logits(batch).float(), batch["labels"])

    def score(self, logits: torch.Tensor, labels: torch.Tensor):
        """(summed task loss, stats) of fp32 logits against the labels."""
        if self.problem_type == "regression":
            loss = F.mse_loss(logits.squeeze(-1), labels, reduction="sum")
            stats = {}
        else:
            loss = F.cross_entropy(logits, labels, reduction="sum")
            stats = {"correct": (logits.detach().argmax(-1) == labels).sum()}
        if not self.training:
            stats.update({"example/logits": logits.detach(), "example/label": labels})
        return {"task": loss}, stats

    def metrics(self, totals):
        out = super().metrics(totals)
        if self.problem_type != "regression":
            out["accuracy"] = totals.get("correct", 0.0) / max(totals.get("count/task", 0.0), 1.0)
        return out

    def example_metrics(self, examples):
        return task_metrics.compute(self.problem_type, examples["logits"], examples["label"])

    # ---- optimizer ------------------------------------------------------------------------------
    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: no decay on biases and norms; with layer-wise decay (full mode), the learning
        rate of encoder layer l is scaled by decay^(layers - l), embeddings by decay^(layers + 1)."""
        decay = getattr(self.args, "layerwise_lr_decay", 1.0) if getattr(self.args, "mode", "") == "full" else 1.0
        layers = getattr(self.model.config, "num_hidden_layers", 0)
        groups: dict = {}
        seen = set()
        for name, p in self.model.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            scale = decay ** (layers + 1 - layer_depth(name, layers)) if decay < 1 else 1.0
            wd = weight_decay if p.ndim >= 2 else 0.0
            group = groups.setdefault((scale, wd), {"params": [], "weight_decay": wd, "lr_scale": scale})
            group["params"].append(p)
        ordered = sorted(groups.values(), key=lambda g: -g["lr_scale"])  # the head's rate first (it is logged)
        return [g for g in ordered if g["params"]]


HEAD_MODULES = ("pre_classifier", "classifier", "score", "pooler")  # modules run once per sequence
_LAYER = re.compile(r"\.(?:layer|layers|h|block|blocks)\.(\d+)\.")


def layer_depth(name: str, layers: int) -> int:
    """0 for embeddings, l + 1 for encoder layer l, layers + 1 for everything above (head, pooler)."""
    m = _LAYER.search(name)
    if m:
        return int(m.group(1)) + 1
    if "embed" in name or ".wte." in name or ".wpe." in name:
        return 0
    return layers + 1


class FrozenHead(SequenceClassifier):
    """The frozen mode: the head trains on cached encoder features; the encoder never runs."""

    def make_dataset(self, features, split: str = "train"):
        return features  # a features.FeatureSet

    def describe_example(self, data) -> str:
        return f"cached feature vectors of size {data.features.shape[1]}"

    def num_tokens(self, batch: dict) -> int:
        return int(batch["num_tokens"].sum())

    def logits(self, batch: dict) -> torch.Tensor:
        return head_logits(self.model, batch["features"])

    def flops(self, batch):
        """The head alone, once per cached feature vector (its first layer computes no input
        gradient: counted 6x, a small overcount)."""
        return flops.dense(flops.matmul_weights(self.model, trained=True), batch["features"].shape[0])
