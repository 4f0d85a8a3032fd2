"""Masked language modelling (BERT).

The vocabulary projection runs only at the masked positions (about 15% of tokens): for small
models that projection is most of the compute, and the other 85% of its outputs would be thrown
away by the loss anyway. Where the architecture's head is not known, the full model runs.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from toolkit.data.collators import MaskedLMCollator
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

    def forward(self, batch):
        loss, correct = masked_lm_loss(
            self.model, batch["input_ids"], batch["labels"], batch.get("token_type_ids"), batch.get("attention_mask")
        )
        return {"mlm": loss}, {"mlm_correct": correct}

    def metrics(self, totals):
        out = super().metrics(totals)
        n = max(totals.get("count/mlm", 0.0), 1.0)
        out["perplexity"] = perplexity(totals.get("loss/mlm", 0.0) / n)
        out["mlm_accuracy"] = totals.get("mlm_correct", 0.0) / n
        return out
