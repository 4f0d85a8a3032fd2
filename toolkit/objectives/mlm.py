"""Masked language modelling (BERT).

The vocabulary projection runs only at the masked positions (about 15% of tokens): for small
models that projection is most of the compute, and the other 85% of its outputs would be thrown
away by the loss anyway. Where the architecture's head is not known, the full model runs.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.data.collators import MaskedLMCollator
from toolkit.engine import flops
from toolkit.objectives.base import Objective, perplexity


def mlm_parts(model: nn.Module):
    """(encoder, head) of a masked-LM model, where the head can run on selected positions only."""
    kind = getattr(model.config, "model_type", "")
    if kind == "bert" and hasattr(model, "cls"):  # BertForMaskedLM and BertForPreTraining
        return model.bert, model.cls.predictions
    if kind in ("roberta", "xlm-roberta", "camembert") and hasattr(model, "lm_head"):
        return model.roberta, model.lm_head
    if kind == "electra" and hasattr(model, "generator_lm_head"):
        return model.electra, nn.Sequential(model.generator_predictions, model.generator_lm_head)
    return None, None


def mlm_flop_shapes(model: nn.Module) -> tuple[flops.Stack, int, int]:
    """(encoder stack, masked-LM head weights, unread pooler weights) for `flops.masked_lm`. Where the
    head is not known the whole model runs at every position (`masked_lm_logits`), so all of it is
    the stack."""
    encoder, head = mlm_parts(model)
    if encoder is None:
        return flops.stack_of(model, skip=()), 0, 0
    return flops.stack_of(encoder), flops.matmul_weights(head), flops.matmul_weights(getattr(encoder, "pooler", None))


def masked_lm_logits(model: nn.Module, input_ids, labels, token_type_ids=None, attention_mask=None):
    """Vocabulary logits at the positions whose label is not -100, one row per position."""
    selected = labels != -100
    encoder, head = mlm_parts(model)
    inputs = dict(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask)
    if encoder is not None:
        return head(encoder(**inputs).last_hidden_state[selected])
    return model(**inputs).logits[selected]


def masked_lm_loss(model: nn.Module, input_ids, labels, token_type_ids=None, attention_mask=None):
    """(summed cross-entropy, number correct) over the positions whose label is not -100."""
    logits = masked_lm_logits(model, input_ids, labels, token_type_ids, attention_mask)
    return token_loss(logits, labels[labels != -100])


def token_loss(logits, target):
    """(summed cross-entropy in fp32, number of correct argmax predictions)."""
    loss = F.cross_entropy(logits.float(), target, reduction="sum")
    correct = (logits.detach().argmax(-1) == target).sum()
    return loss, correct


class MaskedLM(Objective):
    name = "mlm"
    architectures = ("bert",)
    auto_class = "AutoModelForMaskedLM"
    loss_weights = {"mlm": 1.0}
    two_segments = True

    @classmethod
    def needs_word_starts(cls, args) -> bool:
        return args.whole_word_mask

    def make_collator(self, tokenizer, seed: int, salt: str = "train"):
        return self.masking_collator(MaskedLMCollator, tokenizer, seed, salt)

    def counts(self, batch):
        return {"mlm": (batch["labels"] != -100).sum()}

    @functools.cached_property
    def flop_shapes(self):
        return mlm_flop_shapes(self.model)

    def flops(self, batch):
        stack, head, pooler = self.flop_shapes
        sequences, length, masked = flops.batch_shape(batch)
        return flops.masked_lm(stack, head, sequences, length, masked, pooler)

    def forward(self, batch):
        loss, correct = masked_lm_loss(
            self.model, batch["input_ids"], batch["labels"], batch.get("token_type_ids"), batch.get("attention_mask")
        )
        return {"mlm": loss}, {"mlm_correct": correct}

    def pipeline_split(self):
        """BERT in stages: the embeddings first, the blocks in order, the masked-LM head last (run at the
        masked positions only, as `forward` does). The padding mask travels with the hidden states."""
        from transformers.masking_utils import create_bidirectional_mask

        from toolkit.engine.pipeline import Split

        encoder, head = mlm_parts(self.model)
        if getattr(self.model.config, "model_type", "") != "bert" or encoder is None:
            return None
        config = self.model.config

        def inputs(batch):
            ids, types, mask = batch["input_ids"], batch.get("token_type_ids"), batch.get("attention_mask")
            types = torch.zeros_like(ids) if types is None else types
            mask = torch.ones_like(ids) if mask is None else mask  # all ones: SDPA still runs unmasked
            return (ids, types, mask), batch["labels"]

        def block_kwargs(hidden, mask):
            return {
                "attention_mask": create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=mask)
            }

        def loss(hidden, labels):
            selected = labels != -100
            loss, correct = token_loss(head(hidden[selected]), labels[selected])
            return {"mlm": loss}, {"mlm_correct": correct}

        return Split(
            blocks=encoder.encoder.layer,
            first=[encoder.embeddings],
            last=[head],
            inputs=inputs,
            embed=lambda ids, types, mask: (encoder.embeddings(input_ids=ids, token_type_ids=types), mask),
            block_kwargs=block_kwargs,
            loss=loss,
        )

    def metrics(self, totals):
        out = super().metrics(totals)
        n = max(totals.get("count/mlm", 0.0), 1.0)
        out["perplexity"] = perplexity(totals.get("loss/mlm", 0.0) / n)
        out["mlm_accuracy"] = totals.get("mlm_correct", 0.0) / n
        return out
