"""The frozen mode's features: each split encoded once by the frozen encoder, cached on disk.

A frozen encoder gives the same vector for an example in every epoch, so running it every epoch
wastes nearly all of a feature-extraction run. Each split is encoded once, longest-first in
length-sorted batches (little padding), and saved under the cache folder keyed by everything the
vectors depend on (checkpoint files, config overrides, pooling, token ids, precision): a second run,
another head learning rate or more epochs, starts from the cache.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from toolkit.finetuning.heads import pool


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


@torch.no_grad()
def encode(model, hf_dataset, pooling: str, batch_size: int, device, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled vectors, token counts) of every example, in dataset order."""
    base = model.base_model
    was_training = model.training
    model.eval()
    columns = [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in hf_dataset.column_names]
    rows = hf_dataset.select_columns(columns)[:]
    lengths = np.array([len(x) for x in rows["input_ids"]])
    order = np.argsort(-lengths, kind="stable")
    out = torch.empty(len(lengths), model.config.hidden_size)
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
        pooled = pool(model, hidden, batch["input_ids"], batch["attention_mask"], pooling)
        out[torch.from_numpy(chunk)] = pooled.float().cpu()
    model.train(was_training)
    return out, torch.from_numpy(lengths)


def features_for(model, hf_dataset, key: str, cache_dir: Path, pooling: str, batch_size: int, device, autocast):
    """The FeatureSet of a split, from the cache or encoded now (and cached). Returns (set, seconds, hit)."""
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
    regression = hf_dataset.features["labels"].dtype.startswith("float")
    labels = torch.tensor(hf_dataset["labels"][:], dtype=torch.float32 if regression else torch.long)
    return FeatureSet(vectors, labels, counts), time.perf_counter() - start, hit
