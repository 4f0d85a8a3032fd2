"""Labelled examples already tokenized: padded per batch, as the classification objectives and the
compression report read them."""

from __future__ import annotations

import torch


class LengthOrdered(torch.utils.data.Dataset):
    """Rows of a datasets table with their lengths (for length-grouped batches); evaluation reads them
    longest first (batches of similar length) while `idx` stays the row number, so gathered predictions
    come back in dataset order. Subclasses turn `self.rows(indices)` into a batch in `__getitems__`."""

    def __init__(self, hf_dataset, columns: list[str], lengths: list[int], longest_first: bool = False):
        self.ds = hf_dataset.select_columns(columns)
        self._lengths = lengths
        self.order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if longest_first else None

    def __len__(self) -> int:
        return len(self.ds)

    def lengths(self) -> list[int]:
        return self._lengths

    def __getitem__(self, i: int):
        return self.__getitems__([i])

    def rows(self, indices: list[int]) -> tuple[list[int], dict]:
        """(row numbers, the rows' columns) of a batch of positions."""
        if self.order is not None:
            indices = [self.order[i] for i in indices]
        return indices, self.ds[indices]


class PaddedExamples(LengthOrdered):
    """Tokenized examples, padded per batch to its longest example (or always to `pad_to`)."""

    COLUMNS = ("input_ids", "attention_mask", "token_type_ids")

    def __init__(self, hf_dataset, pad_id: int, pad_to: int | None = None, longest_first: bool = False):
        self.columns = [c for c in self.COLUMNS if c in hf_dataset.column_names]
        lengths = [len(ids) for ids in hf_dataset["input_ids"][:]]
        super().__init__(hf_dataset, [*self.columns, "labels"], lengths, longest_first)
        self.pad_id, self.pad_to = pad_id, pad_to
        self.regression = hf_dataset.features["labels"].dtype.startswith("float")

    def __getitems__(self, indices: list[int]) -> dict:
        indices, rows = self.rows(indices)
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
