"""Documents -> token stream -> fixed-length blocks, tokenized once and cached.

Each document is tokenized (fast tokenizer, batched `map`, `num_proc`), a separator token
([SEP] for BERT, <|endoftext|> for GPT) is appended to it, and the documents are concatenated
into one stream that is cut into blocks of exactly `max_seq_length` tokens: no padding, and the
separators keep the document boundaries for later objectives. Encoder models get a [CLS] at the
start of every block. Only the final remainder (shorter than one block) is dropped.

Encoder objectives that train both token types (mlm, rtd) ask for two segments per block instead:
`[CLS] A [SEP] B [SEP]` split at a sentence boundary (`toolkit.data.segments`, `data.segments`).

The blocks are written (token ids as uint16 when the vocabulary fits) to an Arrow file under the cache folder whose name hashes everything they
depend on (input files with sizes and mtimes, reading settings, tokenizer, length, split seed), so
a second run with the same inputs reuses them without tokenizing again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolkit.data import corpus
from toolkit.data.sentences import word_start_flags
from toolkit.errors import ToolkitError
from toolkit.tokenizer import plain_backend, separator_id, token_dtype

CACHE_VERSION = 2  # 2: token ids in the smallest dtype that holds the vocabulary (toolkit.tokenizer.token_dtype)


def cache_root(cache_dir: str | None) -> Path:
    root = cache_dir or os.environ.get("TOOLKIT_CACHE") or Path.home() / ".cache" / "toolkit"
    return Path(root).expanduser()


def tokenizer_hash(tokenizer) -> str:
    """What a tokenizer's output depends on: its backend without the padding and truncation state
    (which transformers sets per call, and which the data path drops: `plain_backend`)."""
    return hashlib.sha256(plain_backend(tokenizer).to_str().encode()).hexdigest()[:16]


def hash_key(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def corpus_key(data, seed: int, train_files: list, val_files: list, tokenizer, word_starts: bool) -> dict:
    """What a tokenized corpus depends on: the files (path, size, mtime), the split, how they are read,
    the tokenizer and the length (the part of a cache key that blocks and sentence pairs share)."""
    return {
        "train": corpus.fingerprint(train_files),
        "validation": corpus.fingerprint(val_files),
        "split": None if val_files else [data.validation_split_percentage, seed],
        "text_field": data.text_field,
        "document_boundary": data.document_boundary,
        "tokenizer": tokenizer_hash(tokenizer),
        "max_seq_length": data.max_seq_length,
        "word_starts": word_starts,
    }


@dataclass
class Blocks:
    """Packed train/validation blocks and what it took to make them."""

    train: object  # datasets.Dataset: `input_ids` of fixed length (and `word_start`; `length`, `segment_b`)
    validation: object | None
    stats: dict
    cache_hit: bool
    path: Path

    def summary(self) -> str:
        s = self.stats
        t = s["train"]
        text = (
            f"corpus{' (cached)' if self.cache_hit else ''}: {t['documents']} documents, "
            f"{t['tokens']} tokens -> {t['blocks']} blocks of {s['max_seq_length']}"
        )
        if s.get("segments") == 2:
            slots = max(t["blocks"] * s["max_seq_length"], 1)
            text += (
                f" ([CLS] A [SEP] B [SEP]; {100 * t['one_segment_blocks'] / max(t['blocks'], 1):.0f}% one segment, "
                f"padding {100 * t['padding'] / slots:.1f}%)"
            )
        return text + (f"; validation {s['validation']['blocks']} blocks" if "validation" in s else "")


def block_prefix(tokenizer) -> list[int]:
    """Encoders start every block with [CLS]; decoders need no prefix."""
    return [tokenizer.cls_token_id] if tokenizer.cls_token_id is not None else []


def prepare_blocks(
    data,
    tokenizer,
    seed: int,
    *,
    word_starts: bool = False,
    segments: int = 1,
    documents=None,
) -> Blocks:
    """Build (or load from cache) the packed train and validation blocks for a DataArgs section.

    `segments=2` splits every block into `[CLS] A [SEP] B [SEP]` (encoders; `toolkit.data.segments`).
    `documents` may be a zero-argument callable returning (train_docs, validation_docs) that were
    already read (e.g. to train the tokenizer), to avoid reading the files twice.
    """
    if segments == 2 and (tokenizer.cls_token_id is None or tokenizer.sep_token_id is None):
        raise ToolkitError(
            "two-segment blocks need a tokenizer with [CLS] and [SEP] tokens: use a WordPiece tokenizer "
            "(tokenizer.kind=wordpiece) or set data.segments=1"
        )
    train_files = corpus.expand(data.train_files, "data.train_files")
    val_files = corpus.expand(data.validation_files, "data.validation_files") if data.validation_files else []
    payload = {"version": CACHE_VERSION, **corpus_key(data, seed, train_files, val_files, tokenizer, word_starts)}
    if segments == 2:  # one-segment caches keep their key; a two-segment layout is drawn from the seed
        payload.update(segments=2, layout_seed=seed)
    key = hash_key(payload)
    path = cache_root(data.cache_dir) / "corpora" / key
    if (path / "meta.json").is_file():
        return _load(path, cache_hit=True)

    train_docs, val_docs = documents() if documents else split_documents(data, seed, train_files, val_files)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=path.parent))
    try:
        stats = {"max_seq_length": data.max_seq_length, "segments": segments}
        for split, docs in (("train", train_docs), ("validation", val_docs)):
            if docs is None:
                continue
            out_file = tmp / f"{split}.arrow"
            if segments == 2:
                from toolkit.data.segments import pack as pack_segments
                from toolkit.data.sentences import tokenize_sentences

                sentences = tokenize_sentences(
                    docs, tokenizer, data.max_seq_length, data.preprocessing_num_workers, word_starts
                )
                stats[split] = pack_segments(
                    sentences, tokenizer, data.max_seq_length, out_file, word_starts, seed, split
                )
            else:
                tokens = tokenize_documents(docs, tokenizer, data.preprocessing_num_workers, word_starts)
                stats[split] = pack(tokens, tokenizer, data.max_seq_length, out_file, word_starts)
            stats[split]["documents"] = len(docs)
            if stats[split]["blocks"] == 0:
                raise ToolkitError(
                    f"the {split} corpus has {stats[split]['tokens']} tokens, fewer than one block of "
                    f"data.max_seq_length={data.max_seq_length}: add text or lower data.max_seq_length"
                )
        (tmp / "meta.json").write_text(json.dumps(stats, indent=2))
        try:
            os.replace(tmp, path)  # atomic: a cache folder is complete or absent
        except OSError:  # another process finished the same cache first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _load(path, cache_hit=False)


def split_documents(data, seed: int, train_files, val_files):
    """Read documents; hold out a seeded fraction of them for validation when no files are given."""
    train = corpus.load_documents(train_files, data.text_field, data.document_boundary, data.max_missing_text_share)
    if len(train) == 0:
        raise ToolkitError("the training files hold no text: every document is empty")
    if val_files:
        val = corpus.load_documents(val_files, data.text_field, data.document_boundary, data.max_missing_text_share)
        if len(val) == 0:
            raise ToolkitError("the validation files hold no text: every document is empty")
        return train, val
    if data.validation_split_percentage <= 0:
        return train, None
    n_val = int(round(len(train) * data.validation_split_percentage / 100))
    if n_val == 0 or n_val >= len(train):
        raise ToolkitError(
            f"cannot hold out {data.validation_split_percentage}% of {len(train)} document(s) for validation: "
            "give data.validation_files, change data.validation_split_percentage, or set "
            "data.document_boundary so that the corpus has more documents"
        )
    parts = train.train_test_split(test_size=n_val, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def tokenize_documents(docs, tokenizer, num_proc: int | None, word_starts: bool):
    """Batched tokenization of every document, separator appended (in parallel for big corpora)."""
    sep = separator_id(tokenizer)
    backend = plain_backend(tokenizer)

    def encode(batch):
        encodings = backend.encode_batch(batch["text"], add_special_tokens=False)
        out = {"input_ids": [e.ids + [sep] for e in encodings]}
        if word_starts:
            out["word_start"] = [word_start_flags(e.word_ids) + [1] for e in encodings]
        return out

    return corpus.map_documents(docs, encode, num_proc, "Tokenizing")


def pack(tokens, tokenizer, max_seq_length: int, out_file: Path, word_starts: bool) -> dict:
    """Concatenate the token stream and cut it into full blocks, written to an Arrow file."""
    import datasets
    from datasets.arrow_writer import ArrowWriter

    prefix = np.array(block_prefix(tokenizer), dtype=np.int32)
    body = max_seq_length - len(prefix)
    columns = ["input_ids"] + (["word_start"] if word_starts else [])
    features = datasets.Features(
        {
            c: datasets.List(
                datasets.Value(token_dtype(tokenizer) if c == "input_ids" else "int8"), length=max_seq_length
            )
            for c in columns
        }
    )
    carry = {c: np.empty(0, dtype=np.int32) for c in columns}
    n_tokens = n_blocks = 0
    with ArrowWriter(features=features, path=str(out_file)) as writer:
        table = tokens.data.table if hasattr(tokens.data, "table") else tokens.data
        for batch in table.to_batches(max_chunksize=10_000):
            stream = {}
            for c in columns:
                flat = batch.column(c).flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
                stream[c] = np.concatenate([carry[c], flat])
            n_tokens += len(stream["input_ids"]) - len(carry["input_ids"])
            n = len(stream["input_ids"]) // body
            if n:
                out = {}
                for c in columns:
                    rows = stream[c][: n * body].reshape(n, body)
                    head = np.broadcast_to(
                        prefix if c == "input_ids" else np.ones(len(prefix), np.int32), (n, len(prefix))
                    )
                    out[c] = np.concatenate([head, rows], axis=1)
                writer.write_batch(out)
                n_blocks += n
            carry = {c: stream[c][n * body :] for c in columns}
        writer.finalize()
    return {"tokens": n_tokens, "blocks": n_blocks, "dropped_tokens": len(carry["input_ids"])}


def _load(path: Path, cache_hit: bool) -> Blocks:
    import datasets

    stats = json.loads((path / "meta.json").read_text())
    train = datasets.Dataset.from_file(str(path / "train.arrow"))
    val_file = path / "validation.arrow"
    val = datasets.Dataset.from_file(str(val_file)) if val_file.is_file() else None
    return Blocks(train=train, validation=val, stats=stats, cache_hit=cache_hit, path=path)
