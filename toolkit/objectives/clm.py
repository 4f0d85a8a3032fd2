"""Causal language modelling (GPT): predict every next token of the packed block."""

from __future__ import annotations

import functools

import torch.nn.functional as F

from toolkit.data.collators import CausalLMCollator
from toolkit.engine import flops
from toolkit.objectives.base import Objective, perplexity


class CausalLM(Objective):
    name = "clm"
    architectures = ("gpt2",)
    auto_class = "AutoModelForCausalLM"
    loss_weights = {"clm": 1.0}

    def make_collator(self, tokenizer, seed: int, salt: str = "train"):
        return CausalLMCollator()

    def counts(self, batch):
        ids = batch["input_ids"]
        return {"clm": ids.new_tensor(ids.shape[0] * (ids.shape[1] - 1))}

    @functools.cached_property
    def flop_shapes(self):
        head = self.model.get_output_embeddings()
        return flops.stack_of(self.model.base_model), flops.matmul_weights(head)

    def flops(self, batch):
        stack, head = self.flop_shapes  # the vocabulary projection runs at every position
        sequences, length, _ = flops.batch_shape(batch)
        return flops.causal_lm(stack, head, sequences, length)

    def forward(self, batch):
        ids = batch["input_ids"]
        logits = self.model(input_ids=ids).logits[:, :-1]
        target = ids[:, 1:]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), reduction="sum")
        correct = (logits.detach().argmax(-1) == target).sum()
        return {"clm": loss}, {"clm_correct": correct}

    def metrics(self, totals):
        out = super().metrics(totals)
        n = max(totals.get("count/clm", 0.0), 1.0)
        out["perplexity"] = perplexity(totals.get("loss/clm", 0.0) / n)
        out["next_token_accuracy"] = totals.get("clm_correct", 0.0) / n
        return out
