"""The frozen mode's features: each split encoded once by the frozen encoder, cached on disk.

A frozen encoder gives the same vector for an example in every epoch, so running it every epoch
wastes nearly all of a feature-extraction run. Each split is encoded once, longest-first in
length-sorted batches (little padding), and saved under the cache folder keyed by everything the
vectors depend on (checkpoint files, config overrides, pooling, token ids, precision): a second run,
another head learning rate or more epochs, starts from the cache.

Sequence classification keeps one pooled vector per example (`FeatureSet`). Token classification
and question answering keep every real token's vector of every window (`pooling=TOKENS`,
`TokenFeatures`, window after window: tokens x hidden x 4 bytes); their objectives read the windows'
labels as before and the cached vectors in place of the encoder (`CachedTokens`).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from toolkit.finetuning.heads import pool

TOKENS = "tokens"  # the "pooling" of per-token features: every real token's vector, none pooled


@dataclass
class FeatureSet(torch.utils.data.Dataset):
    """Pooled encoder outputs of one split (the dataset the frozen head trains on)."""

    features: torch.Tensor  # (examples, hidden)
    labels: torch.Tensor
    num_tokens: torch.Tensor  # real tokens behind each vector (for the tokens-per-second log)

    def __len__(self) -> int:
        return self.features.shape[0]

    def __getitem__(self, i: int):
        return self.__getitems__([i])

    def __getitems__(self, indices: list[int]) -> dict:
        index = torch.tensor(indices, dtype=torch.long)
        return {
            "features": self.features[index],
            "labels": self.labels[index],
            "num_tokens": self.num_tokens[index],
            "idx": index,
        }


def cache_key(model_dir: str, config_overrides: dict, pooling: str, hf_dataset, precision: str) -> str:
    from toolkit.data.blocks import hash_key

    files = sorted(
        p for p in Path(model_dir).iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".bin")
    )
    digest = hashlib.sha256()
    for column in ("input_ids", "attention_mask", "token_type_ids"):
        if column in hf_dataset.column_names:
            for seq in hf_dataset[column][:]:
                digest.update(np.asarray(seq, dtype=np.int32).tobytes() + b"|")
    return hash_key(
        {
            "version": 1,
            "model": [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files],
            "model_dir": str(Path(model_dir).resolve()),
            "config_overrides": config_overrides,
            "pooling": pooling,
            "tokens": digest.hexdigest(),
            "precision": precision,
        }
    )


@dataclass
class TokenFeatures:
    """Per-token encoder outputs of one split's windows (the vectors of each window's real tokens, one
    window after another), beside the tokenized windows they belong to (labels, offsets, sentences)."""

    windows: object  # the tokenized split (a datasets table)
    features: torch.Tensor  # (tokens, hidden)
    num_tokens: torch.Tensor  # real tokens of each window

    def __post_init__(self):
        self.starts = torch.cumsum(self.num_tokens, 0) - self.num_tokens

    def __len__(self) -> int:
        return len(self.num_tokens)

    def padded(self, windows: torch.Tensor, width: int) -> torch.Tensor:
        """(windows, width, hidden): each window's vectors, zeros after its last token."""
        out = self.features.new_zeros(len(windows), width, self.features.shape[1])
        for r, w in enumerate(windows.tolist()):
            n = int(self.num_tokens[w])
            out[r, :n] = self.features[self.starts[w] : self.starts[w] + n]
        return out


class CachedTokens(torch.utils.data.Dataset):
    """The batches of an objective's own window dataset (labels, masks, `idx`) with the windows' cached
    vectors added as `features`, padded like the batch."""

    def __init__(self, windows, cached: TokenFeatures):
        self.windows, self.cached = windows, cached

    def __len__(self) -> int:
        return len(self.windows)

    def lengths(self):
        return self.windows.lengths()

    def __getitem__(self, i: int):
        return self.__getitems__([i])

    def __getitems__(self, indices: list[int]) -> dict:
        batch = self.windows.__getitems__(indices)
        batch["features"] = self.cached.padded(batch["idx"], batch["input_ids"].shape[1])
        return batch


def token_dataset(data, make):
    """`make(table)`: an objective's dataset of a split's windows; with the cached vectors when `data` is
    the split's TokenFeatures (the frozen mode)."""
    if isinstance(data, TokenFeatures):
        return CachedTokens(make(data.windows), data)
    return make(data)


@torch.no_grad()
def encode(model, hf_dataset, pooling: str, batch_size: int, device, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """(vectors, token counts) of every example, in dataset order: one pooled vector per example, or with
    pooling=TOKENS the vectors of every real token, example after example."""
    base = model.base_model
    was_training = model.training
    model.eval()
    columns = [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in hf_dataset.column_names]
    rows = hf_dataset.select_columns(columns)[:]
    lengths = np.array([len(x) for x in rows["input_ids"]])
    order = np.argsort(-lengths, kind="stable")
    per_token = pooling == TOKENS
    starts = np.cumsum(lengths) - lengths
    out = torch.empty(int(lengths.sum()) if per_token else len(lengths), model.config.hidden_size)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = int(lengths[chunk].max())
        batch = {}
        for c in columns:
            t = torch.full((len(chunk), width), pad if c == "input_ids" else 0, dtype=torch.long)
            for r, i in enumerate(chunk):
                t[r, : lengths[i]] = torch.tensor(rows[c][i])
            batch[c] = t.to(device)
        with autocast():
            hidden = base(**batch).last_hidden_state
        if per_token:
            for r, i in enumerate(chunk):
                out[starts[i] : starts[i] + lengths[i]] = hidden[r, : lengths[i]].float().cpu()
            continue
        pooled = pool(model, hidden, batch["input_ids"], batch["attention_mask"], pooling)
        out[torch.from_numpy(chunk)] = pooled.float().cpu()
    model.train(was_training)
    return out, torch.from_numpy(lengths)


def features_for(model, hf_dataset, key: str, cache_dir: Path, pooling: str, batch_size: int, device, autocast):
    """The FeatureSet (TokenFeatures with pooling=TOKENS) of a split, from the cache or encoded now (and
    cached). Returns (set, seconds, hit)."""
    from safetensors.torch import load_file, save_file

    path = cache_dir / f"{key}.safetensors"
    start = time.perf_counter()
    if path.is_file():
        saved = load_file(str(path))
        vectors, counts, hit = saved["features"], saved["num_tokens"], True
    else:
        vectors, counts = encode(model, hf_dataset, pooling, batch_size, device, autocast)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({"features": vectors.contiguous(), "num_tokens": counts.contiguous()}, str(tmp))
        tmp.replace(path)
        hit = False
    if pooling == TOKENS:
        return TokenFeatures(hf_dataset, vectors, counts), time.perf_counter() - start, hit
    regression = hf_dataset.features["labels"].dtype.startswith("float")
    labels = torch.tensor(hf_dataset["labels"][:], dtype=torch.float32 if regression else torch.long)
    return FeatureSet(vectors, labels, counts), time.perf_counter() - start, hit
