"""Collators: a batch of packed blocks -> model inputs and labels.

Masking is `transformers.DataCollatorForLanguageModeling` (15% selected, 80/10/10, whole-word
option, specials never masked, labels -100 elsewhere), driven one example at a time by a generator
seeded from (seed, epoch, example index): the choices do not depend on the batch or process an
example lands in, which is what makes multi-process runs and resumes reproduce a single run.
The sentence-pair collator (NSP) adds the same masking to pairs; the ELECTRA collator adds a seed
per example for the replacements sampled in the model's forward.
"""

from __future__ import annotations

import torch

from toolkit.data.loader import example_generator, example_seed


class MaskedLMCollator:
    def __init__(
        self,
        tokenizer,
        mlm_probability: float = 0.15,
        mask_replace_prob: float = 0.8,
        random_replace_prob: float = 0.1,
        whole_word_mask: bool = False,
        seed: int = 0,
        salt: str = "train",
    ):
        import warnings

        from transformers import DataCollatorForLanguageModeling

        with warnings.catch_warnings():  # whole-word masking turns random replacement off, by design
            warnings.simplefilter("ignore")
            self.masker = DataCollatorForLanguageModeling(
                tokenizer,
                mlm_probability=mlm_probability,
                mask_replace_prob=mask_replace_prob,
                random_replace_prob=random_replace_prob,
                whole_word_mask=whole_word_mask,
            )
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)))
        self.whole_word_mask = whole_word_mask
        self.seed, self.salt, self.epoch = seed, salt, 0

    def __call__(self, batch: dict) -> dict:
        ids = batch["input_ids"]
        special = torch.isin(ids, self.special_ids)
        offsets = _offsets_from_word_starts(batch["word_start"]) if self.whole_word_mask else None
        inputs, labels = torch.empty_like(ids), torch.empty_like(ids)
        for row, idx in enumerate(batch["idx"].tolist()):
            self.masker.generator = example_generator(self.seed, self.salt, self.epoch, idx)
            inputs[row], labels[row] = self.masker.torch_mask_tokens(
                ids[row : row + 1].clone(),
                special_tokens_mask=special[row : row + 1],
                offset_mapping=None if offsets is None else offsets[row : row + 1],
            )
        out = {k: batch[k] for k in ("token_type_ids", "attention_mask") if k in batch}  # two-segment blocks
        return {**out, "input_ids": inputs, "labels": labels}


def _offsets_from_word_starts(word_start: torch.Tensor):
    """Character offsets with a gap exactly before each word start (what transformers' whole-word
    masking reads to group word pieces), for blocks whose text offsets are gone after packing."""
    import numpy as np

    starts = word_start.numpy().astype(np.int64)
    begin = np.arange(starts.shape[1])[None, :] + np.cumsum(starts, axis=1)
    return np.stack([begin, begin + 1], axis=-1)


class CausalLMCollator:
    """Causal LM needs no random choices: labels are the inputs (the model shifts them)."""

    def __init__(self, *args, **kwargs):
        self.epoch = 0

    def __call__(self, batch: dict) -> dict:
        return {"input_ids": batch["input_ids"], "labels": batch["input_ids"]}


class PairCollator:
    """Sentence pairs (already tokenized, typed and padded by the dataset) -> model inputs, with
    masked-LM inputs and labels when the objective also masks (mlm+nsp). Padding is never masked:
    [PAD] is a special token."""

    def __init__(self, masker: MaskedLMCollator | None = None):
        self.masker = masker
        self.epoch = 0

    @property
    def epoch(self) -> int:
        return self._epoch

    @epoch.setter
    def epoch(self, value: int) -> None:  # the engine sets the epoch here; masking follows it
        self._epoch = value
        if self.masker is not None:
            self.masker.epoch = value

    def __call__(self, batch: dict) -> dict:
        out = {k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask", "next_sentence_label")}
        if self.masker is not None:
            out.update(self.masker(batch))
        return out


class ReplacedTokenCollator(MaskedLMCollator):
    """ELECTRA: masked-LM inputs and labels, plus one seed per example for sampling the replacements
    in the model's forward, so that those too depend only on (seed, epoch, example index)."""

    def __call__(self, batch: dict) -> dict:
        out = super().__call__(batch)
        seeds = [example_seed(self.seed, self.salt, self.epoch, idx, "replacements") for idx in batch["idx"].tolist()]
        out["sample_seed"] = torch.tensor(seeds, dtype=torch.long)
        return out
