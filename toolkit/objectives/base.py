"""What an objective is: collator + model head + loss + metrics, as one `nn.Module`.

The engine only ever calls an objective's `forward(batch)`, which returns per-component *summed*
losses and summed statistics, and `counts(batch)`, the number of items each loss sums over.
The engine divides each sum by its count over the whole optimizer step (all micro-batches, all
processes) and weights it by `loss_weights`, so the loss is the same however the step is split.

Being a module, the objective is what `accelerator.prepare` wraps: DDP/DeepSpeed/FSDP see one
forward, and objectives with two networks (ELECTRA) train them with one optimizer.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from toolkit.errors import ToolkitError


class Objective(nn.Module):
    name: ClassVar[str]
    architectures: ClassVar[tuple[str, ...]]  # model.architecture values it can train
    auto_class: ClassVar[str]  # transformers Auto class of the trained model
    loss_weights: ClassVar[dict[str, float]]  # component -> weight in the total loss
    replacement_defaults: ClassVar[tuple[float, float]] = (0.8, 0.1)  # masking: [MASK], random token
    usage: ClassVar[str | None] = None  # model-card snippet ("{path}" = output folder); None: by auto_class
    two_segments: ClassVar[bool] = False  # packed blocks as [CLS] A [SEP] B [SEP] when data.segments is 2

    def __init__(self, model: nn.Module, args):
        super().__init__()
        self.model = model
        self.args = args

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def check_recipe(cls, recipe) -> None:
        """Cross-field rules of this objective (called by the recipe's validate())."""
        if recipe.model.model_name_or_path is None and recipe.model.architecture not in cls.architectures:
            raise ToolkitError(
                f"objective '{cls.name}' cannot train model.architecture '{recipe.model.architecture}': "
                f"use one of {', '.join(cls.architectures)}"
            )

    @classmethod
    def build_model(cls, recipe, tokenizer) -> nn.Module:
        """A fresh model from the size preset, or the checkpoint in model.model_name_or_path."""
        import transformers

        from toolkit.models import ATTN_IMPLEMENTATION, build_config, load_config

        auto = getattr(transformers, cls.auto_class)
        m = recipe.model
        if m.model_name_or_path:
            from toolkit.continuation import base_tokenizer, init_new_rows, load_pretrained
            from toolkit.paths import resolve_path

            path = resolve_path(m.model_name_or_path)
            model = load_pretrained(auto, path, load_config(path, m.config_overrides), cls.name)
            if recipe.tokenizer.extend_vocab:  # rows of the words the tokenizer gained: means of their pieces
                added = init_new_rows(model, base_tokenizer(recipe), tokenizer)
                print(f"vocabulary extended by {added} words, each initialised to the mean of its pieces' embeddings")
            return model
        config = build_config(m.architecture, m.size, tokenizer, recipe.data.max_seq_length, m.config_overrides)
        return auto.from_config(config, attn_implementation=ATTN_IMPLEMENTATION)

    @classmethod
    def from_recipe(cls, recipe, tokenizer) -> Objective:
        return cls(cls.build_model(recipe, tokenizer), recipe.objective)

    @classmethod
    def needs_word_starts(cls, args) -> bool:
        """Whether packed blocks must carry word-start flags (whole-word masking)."""
        return False

    def mask_probability(self) -> float:
        """Share of tokens selected for masking: objective.mlm_probability, or 0.15 (BERT) when unset."""
        return 0.15 if self.args.mlm_probability is None else self.args.mlm_probability

    @classmethod
    def replacement_probs(cls, args) -> tuple[float, float]:
        """(mask_replace_prob, random_replace_prob): the recipe's, or this objective's defaults."""
        mask, random = cls.replacement_defaults
        return (
            mask if args.mask_replace_prob is None else args.mask_replace_prob,
            random if args.random_replace_prob is None else args.random_replace_prob,
        )

    def masking_collator(self, collator_class, tokenizer, seed: int, salt: str = "train"):
        """A masked-LM collator (`MaskedLMCollator` or a subclass) with this recipe's masking options."""
        a = self.args
        mask_prob, random_prob = self.replacement_probs(a)
        return collator_class(
            tokenizer,
            self.mask_probability(),
            mask_prob,
            random_prob,
            a.whole_word_mask,
            seed,
            salt,
            masking=a.masking,
            max_predictions=a.max_predictions_per_seq,
        )

    # ---- data ---------------------------------------------------------------------------------
    @classmethod
    def check_documents(cls, recipe, train_docs, validation_docs) -> None:
        """Rules on the documents themselves, checked as soon as they are read (before tokenizing)."""

    @classmethod
    def prepare_data(cls, recipe, tokenizer, seed: int, documents=None):
        """The train/validation data (`.train`, `.validation`, `.stats`, `.cache_hit`, `.summary()`),
        built once and cached. Packed blocks by default. `documents` is a zero-argument callable
        returning the (train, validation) documents, read only when the cache misses."""
        from toolkit.data.blocks import prepare_blocks

        if recipe.data.streaming:  # read on the fly by each process (toolkit.data.streaming)
            from toolkit.data.streaming import prepare_stream

            return prepare_stream(recipe.data, tokenizer, seed)
        return prepare_blocks(
            recipe.data,
            tokenizer,
            seed,
            word_starts=cls.needs_word_starts(recipe.objective),
            segments=recipe.data.segments if cls.two_segments else 1,
            documents=documents,
        )

    def make_dataset(self, hf_dataset, split: str = "train"):
        """The torch Dataset the engine samples from: indexable, `__getitems__(indices)` returns a
        dict of tensors with an `idx` entry. Packed blocks by default; an objective whose examples
        change per epoch gives a dataset with `set_epoch(epoch)` and a fixed length."""
        from toolkit.data.loader import BlockDataset

        return BlockDataset(hf_dataset)

    def make_collator(self, tokenizer, seed: int, salt: str = "train"):
        raise NotImplementedError

    def describe_example(self, data) -> str:
        """How one training example reads in the start-of-training line ('128 tokens')."""
        return f"{len(data[0]['input_ids'])} tokens"

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """Parameter groups for the optimizer; a group may carry an `lr_scale` (layer-wise decay)."""
        from toolkit.engine.optim import param_groups

        return param_groups(self, weight_decay)

    # ---- the step -----------------------------------------------------------------------------
    def counts(self, batch: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def num_tokens(self, batch: dict) -> int:
        """Tokens in a micro-batch, for the tokens-per-second log."""
        return batch["input_ids"].numel()

    def flops(self, batch: dict) -> float | None:
        """Model FLOPs of one training forward and backward pass on `batch`, counted from what
        `forward` runs (`toolkit.engine.flops`); None when not known: the run then logs no FLOPs
        and refuses training.max_flops."""
        return None

    def forward(self, batch: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        raise NotImplementedError

    def metrics(self, totals: dict[str, float]) -> dict[str, float]:
        """Named metrics from sums over many batches: `loss/<k>`, `count/<k>` and the stats."""
        out = {"loss": 0.0}
        for k, w in self.loss_weights.items():
            n = max(totals.get(f"count/{k}", 0.0), 1.0)
            component = totals.get(f"loss/{k}", 0.0) / n
            out["loss"] += w * component
            if len(self.loss_weights) > 1:
                out[f"{k}_loss"] = component
        return out

    def example_metrics(self, examples: dict[str, torch.Tensor]) -> dict[str, float]:
        """Metrics that need every example (F1, correlations). In eval mode `forward` may return
        per-example tensors as stats named `example/<key>`; `evaluate` gathers them from all
        processes, in dataset order, into `examples[<key>]` (plus `idx`)."""
        return {}

    # ---- outputs ------------------------------------------------------------------------------
    def save_pretrained(self, output_dir, state_dict: dict | None = None) -> None:
        """Write the trained network(s) as ordinary Hugging Face folders."""
        self.model.save_pretrained(output_dir, state_dict=strip_prefix(state_dict, "model."))

    def hf_models(self) -> dict[str, nn.Module]:
        """The transformers models this objective trains, by sub-folder ('' is output_dir)."""
        return {"": self.model}

    def pipeline_split(self):
        """The model cut into pipeline stages (`toolkit.engine.pipeline.Split`: embeddings, blocks, head and
        the loss on the head's output), or None where this model cannot be split. An objective that does not
        override this is refused under training.pipeline_parallel_size > 1."""
        return None


def strip_prefix(state_dict: dict | None, prefix: str) -> dict | None:
    if state_dict is None:
        return None
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")
