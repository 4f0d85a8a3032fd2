"""Batches that do not depend on how a run is split.

The sampler draws one seeded permutation per epoch and cuts it into *global* batches of
`per_device_batch * world_size`; each process takes its slice. One process with batch 2b, one
process with batch b and 2 accumulation steps, and two processes with batch b therefore see the
same examples in each optimizer step. Collators draw their random choices from a generator
seeded by (seed, epoch, example index) alone, so masking is the same however a run is split into
processes, batches or resumes.
"""

from __future__ import annotations

import hashlib

import torch


def example_seed(*parts) -> int:
    """A 63-bit seed that depends only on `parts` (e.g. seed, epoch, example index)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def example_generator(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(example_seed(*parts))


class GlobalBatchSampler:
    """This process's share of each global batch of a seeded per-epoch permutation.

    With `lengths` (variable-length examples), batches group examples of similar length, as
    `group_by_length` does in transformers: the permutation is cut into chunks of 50 global batches,
    each chunk is sorted by length and cut into global batches, and the batches are shuffled. Still a
    pure function of (seed, epoch), so resumes and multi-process runs see the same batches."""

    def __init__(
        self,
        n: int,
        batch_size: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        lengths=None,
    ):
        self.n, self.batch_size, self.world_size, self.rank = n, batch_size, world_size, rank
        self.seed, self.shuffle, self.epoch, self.start = seed, shuffle, 0, 0
        self.lengths = None if lengths is None else torch.as_tensor(lengths)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's permutation; `start` skips that many batches (a resume) without reading them."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.n // (self.batch_size * self.world_size)

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.n, generator=example_generator(self.seed, self.epoch, "shuffle"))
        else:
            order = torch.arange(self.n)
        global_batch = self.batch_size * self.world_size
        if self.lengths is not None and len(self) > 0:
            order = order[: len(self) * global_batch]
            chunks = order.split(global_batch * 50)
            order = torch.cat([c[torch.argsort(self.lengths[c], descending=True, stable=True)] for c in chunks])
            batches = order.view(len(self), global_batch)
            shuffled = torch.randperm(len(self), generator=example_generator(self.seed, self.epoch, "batches"))
            order = batches[shuffled].flatten()
        for k in range(self.start, len(self)):
            start = k * global_batch + self.rank * self.batch_size
            yield order[start : start + self.batch_size].tolist()


class ShardSampler:
    """Evaluation: every example exactly once, example i on process i % world_size, in order.

    `limit` keeps the first `limit` examples (all when None) *before* they are split, so a capped
    evaluation covers the same examples however many processes share it."""

    def __init__(self, n: int, batch_size: int, world_size: int = 1, rank: int = 0, limit: int | None = None):
        self.indices = list(range(rank, n if limit is None else min(n, limit), world_size))
        self.batch_size = batch_size

    def __len__(self) -> int:
        return (len(self.indices) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        for k in range(len(self)):
            yield self.indices[k * self.batch_size : (k + 1) * self.batch_size]


class BlockDataset(torch.utils.data.Dataset):
    """Packed blocks as tensors; fetches a whole batch in one Arrow read (`__getitems__`).

    Two-segment blocks (`toolkit.data.segments`) store `length` and `segment_b` per block; they
    become `token_type_ids` (1 from `segment_b` to `length`) and, only for a batch that holds
    padding, an `attention_mask` (a batch without padding keeps SDPA's unmasked kernel)."""

    def __init__(self, hf_dataset):
        self.ds = hf_dataset.with_format("numpy")
        self.columns = hf_dataset.column_names

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        return self.__getitems__([i])

    def __getitems__(self, indices: list[int]) -> dict:
        rows = self.ds[indices]
        batch = {c: torch.from_numpy(rows[c]).long() for c in self.columns if c not in ("length", "segment_b")}
        if "length" in self.columns:
            position = torch.arange(batch["input_ids"].shape[1])
            length = torch.from_numpy(rows["length"]).long()[:, None]
            segment_b = torch.from_numpy(rows["segment_b"]).long()[:, None]
            batch["token_type_ids"] = ((position >= segment_b) & (position < length)).long()
            if (length < len(position)).any():
                batch["attention_mask"] = (position < length).long()
        batch["idx"] = torch.tensor(indices, dtype=torch.long)
        return batch


def make_loader(dataset, sampler, collator, num_workers: int = 0):
    # A private generator: creating an iterator must not draw from the global RNG, or a resumed run
    # (which creates one right after restoring the RNG state) would see different dropout masks.
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collator,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(0),
    )
