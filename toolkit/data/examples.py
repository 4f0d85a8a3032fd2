"""Labelled examples already tokenized: padded per batch, as the classification objectives and the
compression report read them."""

from __future__ import annotations

import torch


class PaddedExamples(torch.utils.data.Dataset):
    """Tokenized examples, padded per batch to its longest example (or always to `pad_to`)."""

    COLUMNS = ("input_ids", "attention_mask", "token_type_ids")

    def __init__(self, hf_dataset, pad_id: int, pad_to: int | None = None, longest_first: bool = False):
        self.columns = [c for c in self.COLUMNS if c in hf_dataset.column_names]
        self.ds = hf_dataset.select_columns([*self.columns, "labels"])
        self.pad_id, self.pad_to = pad_id, pad_to
        self.regression = hf_dataset.features["labels"].dtype.startswith("float")
        self._lengths = [len(ids) for ids in self.ds["input_ids"][:]]
        # Evaluation reads examples longest first (batches of similar length); `idx` stays the row
        # number, so gathered predictions come back in dataset order.
        self.order = sorted(range(len(self._lengths)), key=lambda i: -self._lengths[i]) if longest_first else None

    def __len__(self) -> int:
        return len(self.ds)

    def lengths(self) -> list[int]:
        return self._lengths

    def __getitem__(self, i: int):
        return self.__getitems__([i])

    def __getitems__(self, indices: list[int]) -> dict:
        if self.order is not None:
            indices = [self.order[i] for i in indices]
        rows = self.ds[indices]
        length = self.pad_to or max(len(ids) for ids in rows["input_ids"])
        batch = {}
        for c in self.columns:
            fill = self.pad_id if c == "input_ids" else 0
            out = torch.full((len(indices), length), fill, dtype=torch.long)
            for r, seq in enumerate(rows[c]):
                out[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            batch[c] = out
        batch["labels"] = torch.tensor(rows["labels"], dtype=torch.float32 if self.regression else torch.long)
        batch["idx"] = torch.tensor(indices, dtype=torch.long)
        return batch


class Passthrough:
    """Batches come padded from the dataset; nothing is random (the engine sets `epoch`)."""

    epoch = 0

    def __call__(self, batch: dict) -> dict:
        return batch
