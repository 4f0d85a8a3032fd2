"""Next-sentence prediction (BERT): `mlm+nsp` (BERT's own pretraining) and `nsp` alone.

Both train `BertForPreTraining`, whose two heads sit on one encoder: the masked-LM head (tied to
the word embeddings) and the NSP head (the pooler's [CLS] vector -> 2 logits; label 0 = IsNext,
1 = NotNext). The examples are sentence pairs `[CLS] A [SEP] B [SEP]` (`toolkit.data.pairs`).

- `mlm+nsp`: masked LM on the pair plus NSP; the loss is the sum of the two mean losses, as in BERT.
- `nsp`: the NSP loss alone. The model is still a `BertForPreTraining`, so the output folder holds
  the same weights as an `mlm+nsp` one and loads without missing weights in `BertForPreTraining`,
  `BertForNextSentencePrediction`, `AutoModelForMaskedLM` and `AutoModelForSequenceClassification`.
  Its masked-LM head (apart from the tied embeddings) is frozen at its initial values: it is not
  trained, and freezing it keeps multi-process (DDP) training free of parameters without gradients.

As in the masked-LM objective, the vocabulary projection runs only at the masked positions.
"""

from __future__ import annotations

import functools

from toolkit.data.collators import MaskedLMCollator, PairCollator
from toolkit.engine import flops
from toolkit.errors import ToolkitError, check_choice
from toolkit.objectives.base import Objective, perplexity
from toolkit.objectives.mlm import token_loss

_USAGE_MLM = """from transformers import pipeline
fill = pipeline("fill-mask", model="{path}")
print(fill("to be or not to be, that is the [MASK]."))
"""
_USAGE_NSP = """import torch
from transformers import AutoTokenizer, BertForNextSentencePrediction
tok = AutoTokenizer.from_pretrained("{path}")
model = BertForNextSentencePrediction.from_pretrained("{path}")
batch = tok("To be, or not to be, that is the question.", "Whether 'tis nobler in the mind to suffer", return_tensors="pt")
print(torch.softmax(model(**batch).logits, -1))  # [P(IsNext), P(NotNext)]"""


class NextSentencePrediction(Objective):
    name = "nsp"
    architectures = ("bert",)
    auto_class = "AutoModelForPreTraining"
    loss_weights = {"nsp": 1.0}
    with_mlm = False
    usage = _USAGE_NSP

    def __init__(self, model, args):
        super().__init__(model, args)
        if not (hasattr(model, "cls") and hasattr(model.cls, "seq_relationship")):
            raise ToolkitError(
                f"objective '{self.name}' needs a BERT model with pretraining heads (BertForPreTraining), "
                f"got {type(model).__name__}: start from scratch with model.architecture=bert, or from a BERT checkpoint"
            )
        if not self.with_mlm:  # untrained here: freeze it (the decoder weight is the embeddings, which train)
            embeddings = model.get_input_embeddings().weight
            for p in model.cls.predictions.parameters():
                if p is not embeddings:
                    p.requires_grad_(False)

    # ---- construction and data ----------------------------------------------------------------
    @classmethod
    def check_recipe(cls, recipe) -> None:
        super().check_recipe(recipe)

        o = recipe.objective
        check_choice("objective.pair_sampling", o.pair_sampling, ("dynamic", "static"))
        if not 0 <= o.short_seq_prob <= 1:
            raise ToolkitError(f"objective.short_seq_prob={o.short_seq_prob} must be between 0 and 1")

    @classmethod
    def needs_word_starts(cls, args) -> bool:
        return cls.with_mlm and args.whole_word_mask

    @classmethod
    def check_documents(cls, recipe, train_docs, validation_docs) -> None:
        from toolkit.data.pairs import check_document_count

        check_document_count("train", len(train_docs))
        if validation_docs is not None:
            check_document_count("validation", len(validation_docs))

    @classmethod
    def prepare_data(cls, recipe, tokenizer, seed: int, documents=None):
        from toolkit.data.pairs import prepare_pairs

        o = recipe.objective
        return prepare_pairs(
            recipe.data,
            tokenizer,
            seed,
            short_seq_prob=o.short_seq_prob,
            dynamic=o.pair_sampling == "dynamic",
            word_starts=cls.needs_word_starts(o),
            documents=documents,
        )

    def make_dataset(self, hf_dataset, split: str = "train"):
        return hf_dataset  # already a torch Dataset of pairs (toolkit.data.pairs.SentencePairs)

    def make_collator(self, tokenizer, seed: int, salt: str = "train"):
        masker = self.masking_collator(MaskedLMCollator, tokenizer, seed, salt) if self.with_mlm else None
        return PairCollator(masker)

    # ---- the step -----------------------------------------------------------------------------
    def counts(self, batch):
        out = {"nsp": batch["next_sentence_label"].new_tensor(batch["next_sentence_label"].numel())}
        if self.with_mlm:
            out["mlm"] = (batch["labels"] != -100).sum()
        return out

    @functools.cached_property
    def flop_shapes(self):
        bert, heads = self.model.bert, self.model.cls
        mlm_head = flops.matmul_weights(heads.predictions) if self.with_mlm else 0  # nsp alone never runs it
        return (
            flops.stack_of(bert),
            flops.matmul_weights(bert.pooler),
            flops.matmul_weights(heads.seq_relationship),
            mlm_head,
        )

    def flops(self, batch):
        stack, pooler, classifier, mlm_head = self.flop_shapes
        sequences, length, masked = flops.batch_shape(batch)
        return flops.next_sentence(stack, pooler, classifier, sequences, length, mlm_head, masked)

    def forward(self, batch):
        bert, heads = self.model.bert, self.model.cls
        encoded = bert(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],
        )
        nsp_loss, nsp_correct = token_loss(heads.seq_relationship(encoded.pooler_output), batch["next_sentence_label"])
        losses, stats = {"nsp": nsp_loss}, {"nsp_correct": nsp_correct}
        if self.with_mlm:
            selected = batch["labels"] != -100
            logits = heads.predictions(encoded.last_hidden_state[selected])
            losses["mlm"], stats["mlm_correct"] = token_loss(logits, batch["labels"][selected])
        return losses, stats

    def metrics(self, totals):
        out = super().metrics(totals)
        out["nsp_accuracy"] = totals.get("nsp_correct", 0.0) / max(totals.get("count/nsp", 0.0), 1.0)
        if self.with_mlm:
            n = max(totals.get("count/mlm", 0.0), 1.0)
            out["perplexity"] = perplexity(totals.get("loss/mlm", 0.0) / n)
            out["mlm_accuracy"] = totals.get("mlm_correct", 0.0) / n
        return out


class MaskedLMWithNSP(NextSentencePrediction):
    name = "mlm+nsp"
    loss_weights = {"mlm": 1.0, "nsp": 1.0}
    with_mlm = True
    usage = _USAGE_MLM + _USAGE_NSP
