"""Collators: a batch of packed blocks -> model inputs and labels.

Masking follows BERT: tokens are *selected* (specials and padding never), their labels are the
originals (-100 elsewhere), and each selected token becomes [MASK] (80%), a random token (10%) or
stays (10%); the objective or the recipe may change those shares (ELECTRA: 85/0/15). Selection is
`masking=bernoulli` (each token, or each whole word, with probability `mlm_probability`) or
`fixed_count` (exactly round(mlm_probability x sequence length) tokens, as BERT's
create_pretraining_data.py and ELECTRA's pretrain_helpers.mask), and at most `max_predictions`
tokens either way. With whole-word masking, words are chosen whole and budgets count their pieces.

`transformers.DataCollatorForLanguageModeling` does the Bernoulli selection (by token or by word)
and the replacement split; what it lacks (a fixed count, a cap, the split after whole-word
selection, which it forces to all-[MASK]) is `_within_budget` below plus the library's replacement
run on the chosen positions. Every choice comes from a generator seeded by (seed, epoch, example
index): the masks do not depend on the batch or process an example lands in, which is what makes
multi-process runs and resumes reproduce a single run.
The sentence-pair collator (NSP) adds the same masking to pairs; the ELECTRA collator adds a seed
per example for the replacements sampled in the model's forward.
"""

from __future__ import annotations

import torch

from toolkit.data.loader import example_generator, example_seed

MASKING = ("bernoulli", "fixed_count")


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
        masking: str = "bernoulli",
        max_predictions: int | None = None,
    ):
        import warnings

        from transformers import DataCollatorForLanguageModeling

        def library(p: float, whole_word: bool = False):
            return DataCollatorForLanguageModeling(
                tokenizer,
                mlm_probability=p,
                mask_replace_prob=mask_replace_prob,
                random_replace_prob=random_replace_prob,
                whole_word_mask=whole_word,
            )

        # Bernoulli selection and replacement in one call (no whole words: the library does it all).
        self.masker = library(mlm_probability)
        # Bernoulli selection of whole words; the library then forces [MASK] on every piece (and
        # warns), so only its selection is used.
        if whole_word_mask:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.word_selector = library(mlm_probability, whole_word=True)
        # The replacement split alone: probability 1 on exactly the chosen positions. It is drawn for
        # each piece, whole words included, as BERT's create_masked_lm_predictions draws it.
        self.replacer = library(1.0)
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)))
        self.pad_id = tokenizer.pad_token_id
        self.mlm_probability, self.whole_word_mask = mlm_probability, whole_word_mask
        self.masking, self.max_predictions = masking, max_predictions
        self.seed, self.salt, self.epoch = seed, salt, 0

    def __call__(self, batch: dict) -> dict:
        ids = batch["input_ids"]
        special = torch.isin(ids, self.special_ids)
        if self.whole_word_mask:
            words = _word_ids(batch["word_start"], special)
            offsets = _offsets_from_word_starts(batch["word_start"])
        else:
            words = torch.arange(ids.shape[1]).expand_as(ids)  # every piece is its own unit
        inputs, labels = torch.empty_like(ids), torch.empty_like(ids)
        for row, idx in enumerate(batch["idx"].tolist()):
            generator = example_generator(self.seed, self.salt, self.epoch, idx)
            one, not_maskable = ids[row : row + 1], special[row : row + 1]
            if self.masking == "fixed_count":
                chosen = _within_budget(~not_maskable[0], words[row], self.fixed_count(one[0]), generator)
            elif self.whole_word_mask:
                self.word_selector.generator = generator
                _, selected = self.word_selector.torch_mask_tokens(
                    one.clone(), special_tokens_mask=not_maskable, offset_mapping=offsets[row : row + 1]
                )
                chosen = _within_budget(selected[0] != -100, words[row], self.max_predictions, generator)
            else:  # single pieces by Bernoulli: the library selects and replaces; a cap then drops a part
                self.masker.generator = generator
                x, y = self.masker.torch_mask_tokens(one.clone(), special_tokens_mask=not_maskable)
                chosen = _within_budget(y[0] != -100, words[row], self.max_predictions, generator)
                dropped = (y[0] != -100) & ~chosen  # over the cap: back to the original, unlabelled
                x[0, dropped], y[0, dropped] = one[0, dropped], -100
                inputs[row], labels[row] = x, y
                continue
            self.replacer.generator = generator
            inputs[row], labels[row] = self.replacer.torch_mask_tokens(one.clone(), special_tokens_mask=~chosen[None])
        out = {k: batch[k] for k in ("token_type_ids", "attention_mask") if k in batch}  # two-segment blocks
        return {**out, "input_ids": inputs, "labels": labels}

    def fixed_count(self, ids: torch.Tensor) -> int:
        """Predictions per sequence for `fixed_count`: min(cap, max(1, round(p x length))), the
        length counting every token but padding ([CLS] and [SEP] included), as BERT and ELECTRA."""
        length = ids.numel() if self.pad_id is None else int((ids != self.pad_id).sum())
        count = max(1, round(length * self.mlm_probability))
        return count if self.max_predictions is None else min(count, self.max_predictions)


def _within_budget(candidates: torch.Tensor, words: torch.Tensor, budget: int | None, generator) -> torch.Tensor:
    """The positions of a random subset of the candidate words, taken in random order while their
    pieces still fit in `budget` (a word that would overflow it is skipped, as in BERT's
    create_masked_lm_predictions), so the budget is never exceeded. `budget=None`: all of them."""
    if budget is None or int(candidates.sum()) <= budget:
        return candidates
    ids, sizes = torch.unique(words[candidates], return_counts=True)
    order = torch.randperm(len(ids), generator=generator)
    keep, total = [], 0
    for word, size in zip(ids[order].tolist(), sizes[order].tolist()):
        if total + size <= budget:
            keep.append(word)
            total += size
        if total == budget:
            break
    return candidates & torch.isin(words, torch.tensor(keep, dtype=words.dtype))


def _word_ids(word_start: torch.Tensor, special: torch.Tensor) -> torch.Tensor:
    """A word number per piece (pieces of one word share it): a word starts at a flagged piece or
    right after a special token (a word cut by a block or segment start is a word of its own)."""
    after_special = torch.cat([torch.ones_like(special[:, :1]), special[:, :-1]], dim=1)
    return torch.cumsum(~special & (word_start.bool() | after_special), dim=1)


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
