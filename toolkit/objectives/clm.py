"""Causal language modelling (GPT): predict every next token of the packed block."""

from __future__ import annotations

import functools

import torch
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
        return next_token_loss(self.model(input_ids=ids).logits, ids)

    def pipeline_split(self):
        """GPT-2 in stages: token and position embeddings first, the blocks in order, the final norm and the
        LM head last."""
        from transformers.masking_utils import create_causal_mask

        from toolkit.engine.pipeline import Split

        model = self.model
        if getattr(model.config, "model_type", "") != "gpt2":
            return None
        body = model.transformer

        def positions(hidden):
            return torch.arange(hidden.shape[1], device=hidden.device)[None]

        def embed(ids):
            return (body.drop(body.wte(ids) + body.wpe(positions(ids))),)

        def block_kwargs(hidden):
            at = positions(hidden)
            mask = create_causal_mask(
                config=model.config, inputs_embeds=hidden, attention_mask=None, cache=None, position_ids=at
            )
            return {"attention_mask": mask, "position_ids": at}

        return Split(
            blocks=body.h,
            first=[body.wte, body.wpe],
            last=[body.ln_f, model.lm_head],
            inputs=lambda batch: ((batch["input_ids"],), batch["input_ids"]),
            embed=embed,
            block_kwargs=block_kwargs,
            loss=lambda hidden, ids: next_token_loss(model.lm_head(body.ln_f(hidden)), ids),
        )

    def metrics(self, totals):
        out = super().metrics(totals)
        n = max(totals.get("count/clm", 0.0), 1.0)
        out["perplexity"] = perplexity(totals.get("loss/clm", 0.0) / n)
        out["next_token_accuracy"] = totals.get("clm_correct", 0.0) / n
        return out


def next_token_loss(logits, ids):
    """({"clm": summed cross-entropy in fp32}, {"clm_correct": correct argmax}) of predicting every next token."""
    logits, target = logits[:, :-1], ids[:, 1:]
    loss = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), reduction="sum")
    correct = (logits.detach().argmax(-1) == target).sum()
    return {"clm": loss}, {"clm_correct": correct}
