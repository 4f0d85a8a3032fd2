"""Documents -> sentences -> sentence-pair examples for next-sentence prediction (BERT).

Built once and cached (like packed blocks): every document is split into sentences (offline, by
punctuation), the sentences are tokenized in batches with the fast tokenizer, and the result is
stored as flat numpy arrays: the tokens, where each segment (sentence) starts, where each document
starts. A sentence longer than a pair can hold is cut into pieces of at most half a pair, so that
a long sentence still yields pairs instead of one truncated segment.

Examples are drawn from those arrays on the fly, following BERT's `create_pretraining_data.py`:
example i starts at a fixed *anchor* segment (anchors are laid greedily so that each covers about
one full example of text); from it, consecutive sentences are gathered up to a target length
(`max_seq_length - 3`, or with probability `short_seq_prob` a random shorter one) and split at a
random sentence boundary into A and B. With probability 0.5, B is replaced by text from a random
position of a *different* document (label 1, NotNext; 0 is IsNext, the Hugging Face convention).
The longer segment is then trimmed, one token at a time from its front or back at random, until
`[CLS] A [SEP] B [SEP]` fits.

Unlike BERT, the label is drawn with probability exactly 0.5 for every example: BERT forces NotNext
whenever its chunk holds a single sentence, which skews the classes on corpora of short documents.
Anchors are therefore only laid where a following sentence exists in the same document, and
one-sentence documents serve only as the source of NotNext segments.

Every random choice of example i depends only on (seed, split, epoch, i) (the epoch is fixed at 0
for static pairs): the same recipe gives the same pairs whatever the processes, batches or resumes.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from toolkit.data import corpus
from toolkit.data.blocks import cache_root, hash_key, tokenizer_hash, word_start_flags
from toolkit.data.loader import example_seed
from toolkit.errors import ToolkitError

CACHE_VERSION = 1
SPECIALS_PER_PAIR = 3  # [CLS] A [SEP] B [SEP]

# ---------------------------------------------------------------------------------------------
# Sentences
# ---------------------------------------------------------------------------------------------

_PARAGRAPH = re.compile(r"\n\s*\n")
# Sentence-final punctuation with any closing quotes or brackets after it.
_SENTENCE_END = re.compile(r"[.!?\u2026\u3002\uff01\uff1f]+[\"'\u201d\u2019)\]\u00bb]*")
_CJK_END = "\u3002\uff01\uff1f"


def split_sentences(text: str) -> list[str]:
    """Split plain text into sentences, offline and without a model.

    A blank line always ends a sentence (headings, list items); inside a paragraph, line breaks are
    just spaces, and a sentence ends at . ! ? or an ellipsis followed by a space and a character
    that is not a lower-case letter (so "e.g. this" stays whole; an abbreviation before a capital,
    "Mr. Smith", is split, which only moves a possible A/B boundary). CJK full stops end a sentence
    with no space after them.
    """
    sentences = []
    for paragraph in _PARAGRAPH.split(text):
        paragraph = " ".join(paragraph.split())
        start = 0
        for m in _SENTENCE_END.finditer(paragraph):
            end = m.end()
            after = paragraph[end : end + 2]
            if m.group()[0] in _CJK_END or (len(after) == 2 and after[0] == " " and not after[1].islower()):
                sentences.append(paragraph[start:end].strip())
                start = end
        sentences.append(paragraph[start:].strip())
    return [s for s in sentences if s]


def piece_lengths(n: int, max_tokens: int) -> list[int]:
    """A sentence of n tokens as segments: whole if a pair can hold it, else even pieces of at most
    half a pair (so that two consecutive pieces make an untruncated IsNext pair)."""
    if n <= max_tokens:
        return [n]
    k = -(-n // max(1, max_tokens // 2))
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


# ---------------------------------------------------------------------------------------------
# Building (cached): documents -> token, segment and document arrays
# ---------------------------------------------------------------------------------------------


@dataclass
class Pairs:
    """Train/validation sentence-pair datasets and what it took to make them."""

    train: SentencePairs
    validation: SentencePairs | None
    stats: dict
    cache_hit: bool
    path: Path

    def summary(self) -> str:
        s = self.stats["train"]
        text = (
            f"sentence pairs{' (cached)' if self.cache_hit else ''}: {s['documents']} documents "
            f"({s['one_segment_documents']} of one sentence), {s['segments']} sentences, {s['tokens']} tokens -> "
            f"{s['examples']} pairs per epoch of at most {self.stats['max_seq_length']} tokens"
        )
        if self.validation is not None:
            text += f"; validation {self.stats['validation']['examples']} pairs"
        if s["short_anchor_share"] > 0.5:
            text += (
                f"\nwarning: {100 * s['short_anchor_share']:.0f}% of pairs start in a document too short to fill "
                f"data.max_seq_length={self.stats['max_seq_length']}: IsNext pairs will be shorter than NotNext "
                "pairs, which lets the model tell them apart by length; use longer documents "
                "(e.g. data.document_boundary=file) or a shorter data.max_seq_length"
            )
        return text


def prepare_pairs(
    data,
    tokenizer,
    seed: int,
    *,
    short_seq_prob: float = 0.1,
    dynamic: bool = True,
    word_starts: bool = False,
    documents=None,
) -> Pairs:
    """Build (or load from cache) the sentence-pair datasets for a DataArgs section.

    `documents` may be a zero-argument callable returning (train_docs, validation_docs) already
    read; it is called only when the cache misses.
    """
    check_tokenizer(tokenizer)
    train_files = corpus.expand(data.train_files, "data.train_files")
    val_files = corpus.expand(data.validation_files, "data.validation_files") if data.validation_files else []
    key = hash_key(
        {
            "version": CACHE_VERSION,
            "kind": "sentence-pairs",
            "train": corpus.fingerprint(train_files),
            "validation": corpus.fingerprint(val_files),
            "split": None if val_files else [data.validation_split_percentage, seed],
            "text_field": data.text_field,
            "document_boundary": data.document_boundary,
            "tokenizer": tokenizer_hash(tokenizer),
            "max_seq_length": data.max_seq_length,
            "word_starts": word_starts,
        }
    )
    path = cache_root(data.cache_dir) / "pairs" / key
    cache_hit = (path / "meta.json").is_file()
    if not cache_hit:
        if documents is None:
            from toolkit.data.blocks import split_documents

            train_docs, val_docs = split_documents(data, seed, train_files, val_files)
        else:
            train_docs, val_docs = documents()
        _build(path, train_docs, val_docs, tokenizer, data, word_starts)
    stats = json.loads((path / "meta.json").read_text())
    options = dict(
        tokenizer=tokenizer,
        max_seq_length=data.max_seq_length,
        seed=seed,
        short_seq_prob=short_seq_prob,
        dynamic=dynamic,
    )
    train = SentencePairs(path / "train", split="train", **options)
    val = SentencePairs(path / "validation", split="eval", **options) if "validation" in stats else None
    return Pairs(train=train, validation=val, stats=stats, cache_hit=cache_hit, path=path)


def check_tokenizer(tokenizer) -> None:
    missing = [t for t in ("cls_token", "sep_token", "pad_token") if getattr(tokenizer, f"{t}_id", None) is None]
    if missing:
        raise ToolkitError(
            f"next-sentence prediction needs a tokenizer with [CLS], [SEP] and [PAD] tokens; this one lacks "
            f"{', '.join(missing)}: use a WordPiece tokenizer (tokenizer.kind=wordpiece)"
        )


def check_document_count(split: str, n_docs: int, what: str = "documents") -> None:
    """NotNext pairs take segment B from a *different* document: one document cannot make them."""
    if n_docs < 2:
        fix = (
            "add documents, or split the text into more documents with data.document_boundary=blank_line (or line)"
            if split == "train"
            else "give more data.validation_files or raise data.validation_split_percentage"
        )
        raise ToolkitError(
            f"next-sentence prediction needs at least two {split} documents (NotNext pairs take segment B from "
            f"a different document), but the {split} split holds {n_docs} {what}: {fix}"
        )


def _build(path: Path, train_docs, val_docs, tokenizer, data, word_starts: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        stats: dict = {"max_seq_length": data.max_seq_length}
        for split, docs in (("train", train_docs), ("validation", val_docs)):
            if docs is None:
                continue
            check_document_count(split, len(docs))
            segments = tokenize_sentences(
                docs, tokenizer, data.max_seq_length, data.preprocessing_num_workers, word_starts
            )
            stats[split] = write_arrays(segments, tmp / split, data.max_seq_length, word_starts)
            check_document_count(split, stats[split]["documents"], "documents with any token")
            if stats[split]["examples"] == 0:
                raise ToolkitError(
                    f"no {split} document has two sentences, so no IsNext pair can be made: next-sentence "
                    "prediction needs documents of several sentences (with data.document_boundary=line each "
                    "line is a document; try blank_line or file)"
                )
        (tmp / "meta.json").write_text(json.dumps(stats, indent=2))
        try:
            os.replace(tmp, path)  # atomic: a cache folder is complete or absent
        except OSError:  # another process finished the same cache first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def tokenize_sentences(docs, tokenizer, max_seq_length: int, num_proc: int | None, word_starts: bool):
    """Per document: its tokens (`ids`), segment lengths (`lengths`), optional word-start flags."""
    backend = tokenizer.backend_tokenizer
    max_tokens = max_seq_length - SPECIALS_PER_PAIR

    def encode(batch):
        sentences = [split_sentences(text) for text in batch["text"]]
        flat = [s for doc in sentences for s in doc]
        encodings = iter(backend.encode_batch(flat, add_special_tokens=False) if flat else [])
        out: dict = {"ids": [], "lengths": [], "long_sentences": []}
        if word_starts:
            out["word_start"] = []
        for doc in sentences:
            ids, lengths, starts, n_long = [], [], [], 0
            for _ in doc:
                e = next(encodings)
                if not e.ids:
                    continue
                pieces = piece_lengths(len(e.ids), max_tokens)
                n_long += len(pieces) > 1
                ids += e.ids
                lengths += pieces
                if word_starts:
                    starts += word_start_flags(e.word_ids)
            out["ids"].append(ids)
            out["lengths"].append(lengths)
            out["long_sentences"].append(n_long)
            if word_starts:
                out["word_start"].append(starts)
        return out

    if num_proc is None:
        num_proc = min(os.cpu_count() or 1, 8) if len(docs) >= 20_000 else None
    return docs.map(
        encode,
        batched=True,
        batch_size=1000,
        num_proc=num_proc if num_proc and num_proc > 1 else None,
        remove_columns=docs.column_names,
        desc="Splitting and tokenizing sentences",
    )


def write_arrays(segments, folder: Path, max_seq_length: int, word_starts: bool) -> dict:
    """Flatten the per-document rows into .npy arrays (memory-mapped when read) and lay the anchors."""
    import pyarrow.compute as pc

    folder.mkdir(parents=True)
    table = segments.data.table if hasattr(segments.data, "table") else segments.data
    lengths_col = table.column("lengths").combine_chunks()
    per_doc = pc.list_value_length(lengths_col).to_numpy(zero_copy_only=False).astype(np.int64)
    seg_lengths = lengths_col.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    kept = per_doc > 0  # documents whose text tokenizes to nothing are dropped
    doc_offsets = np.concatenate([[0], np.cumsum(per_doc[kept])]).astype(np.int64)
    seg_offsets = np.concatenate([[0], np.cumsum(seg_lengths)]).astype(np.int64)

    columns = [("ids", "tokens", np.int32)] + ([("word_start", "word_start", np.int8)] if word_starts else [])
    for column, name, dtype in columns:
        out = np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=dtype, shape=(int(seg_offsets[-1]),))
        pos = 0
        for batch in table.select([column]).to_batches(max_chunksize=10_000):
            flat = batch.column(0).flatten().to_numpy(zero_copy_only=False)
            out[pos : pos + len(flat)] = flat
            pos += len(flat)
        out.flush()
        del out
    max_tokens = max_seq_length - SPECIALS_PER_PAIR
    anchors = lay_anchors(seg_lengths, doc_offsets, max_tokens)
    np.save(folder / "segment_offsets.npy", seg_offsets)
    np.save(folder / "document_offsets.npy", doc_offsets)
    np.save(folder / "anchors.npy", anchors)

    # Share of anchors whose document, from the anchor on, cannot fill a pair (length would leak the label).
    doc_of_anchor = np.searchsorted(doc_offsets, anchors, side="right") - 1
    left = seg_offsets[doc_offsets[doc_of_anchor + 1]] - seg_offsets[anchors]
    return {
        "documents": int(kept.sum()),
        "dropped_documents": int((~kept).sum()),
        "one_segment_documents": int((per_doc[kept] == 1).sum()),
        "segments": int(len(seg_lengths)),
        "long_sentences_split": int(sum(table.column("long_sentences").to_pylist())),
        "tokens": int(seg_offsets[-1]),
        "examples": int(len(anchors)),
        "short_anchor_share": float((left < max_tokens).mean()) if len(anchors) else 0.0,
    }


def lay_anchors(seg_lengths: np.ndarray, doc_offsets: np.ndarray, max_tokens: int) -> np.ndarray:
    """Segments where examples start: greedily, each after about one full pair of text, and only
    where the same document holds a following segment (so that IsNext is always possible)."""
    anchors = []
    for d in range(len(doc_offsets) - 1):
        s, end = int(doc_offsets[d]), int(doc_offsets[d + 1])
        while s < end - 1:
            anchors.append(s)
            total = 0
            while s < end and total < max_tokens:
                total += int(seg_lengths[s])
                s += 1
    return np.asarray(anchors, dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# Drawing examples
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    """Where one example's segments come from: token ranges [start, end) of the flat token array
    after truncation, segment ranges before it, and the label (0 IsNext, 1 NotNext)."""

    label: int
    doc_a: int
    doc_b: int
    segments_a: tuple[int, int]
    segments_b: tuple[int, int]
    tokens_a: tuple[int, int]
    tokens_b: tuple[int, int]


def truncate_pair(rng: random.Random, len_a: int, len_b: int, max_tokens: int) -> tuple[int, int, int, int]:
    """BERT's truncation: remove tokens from the longer segment (B on ties), each from its front or
    back at random, until both fit. Returns (a_front, a_back, b_front, b_back) tokens removed."""
    cut_a = cut_b = 0
    while len_a - cut_a + len_b - cut_b > max_tokens:
        if len_a - cut_a > len_b - cut_b:
            cut_a += 1
        else:
            cut_b += 1
    a_front = bin(rng.getrandbits(cut_a)).count("1") if cut_a else 0  # Binomial(cut, 1/2)
    b_front = bin(rng.getrandbits(cut_b)).count("1") if cut_b else 0
    return a_front, cut_a - a_front, b_front, cut_b - b_front


class SentencePairs(torch.utils.data.Dataset):
    """Sentence-pair examples of one split: a fixed number per epoch (one per anchor), drawn anew
    each epoch (dynamic) or the same every epoch (static). Padded to `max_seq_length`."""

    def __init__(
        self,
        folder: Path,
        tokenizer,
        max_seq_length: int,
        seed: int,
        split: str = "train",
        short_seq_prob: float = 0.1,
        dynamic: bool = True,
    ):
        self.folder = Path(folder)
        self.cls, self.sep, self.pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
        self.max_seq_length, self.max_tokens = max_seq_length, max_seq_length - SPECIALS_PER_PAIR
        self.seed, self.salt = seed, f"pairs-{split}"
        self.short_seq_prob, self.dynamic = short_seq_prob, dynamic
        self.epoch = 0
        self.word_starts = (self.folder / "word_start.npy").is_file()
        self._arrays: dict | None = None

    # The arrays are memory-mapped on first use (and again in each DataLoader worker).
    def __getstate__(self):
        return {**self.__dict__, "_arrays": None}

    @property
    def arrays(self) -> dict:
        if self._arrays is None:
            names = ["tokens", "segment_offsets", "document_offsets", "anchors"]
            names += ["word_start"] if self.word_starts else []
            self._arrays = {n: np.load(self.folder / f"{n}.npy", mmap_mode="r") for n in names}
        return self._arrays

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.arrays["anchors"])

    def pair(self, idx: int, epoch: int | None = None) -> Pair:
        """Example `idx` of `epoch` (default: the current one); a pure function of (seed, split, epoch, idx)."""
        a = self.arrays
        epoch = (self.epoch if epoch is None else epoch) if self.dynamic else 0
        rng = random.Random(example_seed(self.seed, self.salt, epoch, idx))
        docs, offsets = a["document_offsets"], a["segment_offsets"]

        def length(first: int, last: int) -> int:  # tokens in segments [first, last)
            return int(offsets[last] - offsets[first])

        target = self.max_tokens
        if rng.random() < self.short_seq_prob:
            target = rng.randint(2, self.max_tokens)
        start = int(a["anchors"][idx])
        doc = int(np.searchsorted(docs, start, side="right")) - 1
        doc_end = int(docs[doc + 1])
        is_random_next = rng.random() < 0.5

        # A chunk of consecutive segments from the anchor up to the target (at least two for IsNext);
        # A is a random non-empty prefix of it, and for IsNext B is the rest.
        end = start + 1
        while end < doc_end and (length(start, end) < target or (not is_random_next and end - start < 2)):
            end += 1
        a_end = rng.randint(start + 1, end - 1) if end - start >= 2 else end
        if is_random_next:
            other = rng.randrange(len(docs) - 2)  # any document but this one
            doc_b = other + (other >= doc)
            b_start = rng.randrange(int(docs[doc_b]), int(docs[doc_b + 1]))
            b_end, b_doc_end = b_start + 1, int(docs[doc_b + 1])
            target_b = max(1, target - length(start, a_end))
            while b_end < b_doc_end and length(b_start, b_end) < target_b:
                b_end += 1
        else:
            doc_b, b_start, b_end = doc, a_end, end

        len_a, len_b = length(start, a_end), length(b_start, b_end)
        a_front, a_back, b_front, b_back = truncate_pair(rng, len_a, len_b, self.max_tokens)
        ta, tb = int(offsets[start]), int(offsets[b_start])
        return Pair(
            label=int(is_random_next),
            doc_a=doc,
            doc_b=doc_b,
            segments_a=(start, a_end),
            segments_b=(b_start, b_end),
            tokens_a=(ta + a_front, ta + len_a - a_back),
            tokens_b=(tb + b_front, tb + len_b - b_back),
        )

    def __getitems__(self, indices: list[int]) -> dict:
        n, length = len(indices), self.max_seq_length
        input_ids = torch.full((n, length), self.pad, dtype=torch.long)
        token_type_ids = torch.zeros((n, length), dtype=torch.long)
        attention_mask = torch.zeros((n, length), dtype=torch.long)
        word_start = torch.ones((n, length), dtype=torch.long) if self.word_starts else None
        labels = torch.empty(n, dtype=torch.long)
        tokens = self.arrays["tokens"]
        for row, idx in enumerate(indices):
            p = self.pair(idx)
            a, b = tokens[slice(*p.tokens_a)], tokens[slice(*p.tokens_b)]
            ids = np.concatenate([[self.cls], a, [self.sep], b, [self.sep]])
            input_ids[row, : len(ids)] = torch.from_numpy(ids.astype(np.int64))
            token_type_ids[row, len(a) + 2 : len(ids)] = 1
            attention_mask[row, : len(ids)] = 1
            if word_start is not None:
                ws = self.arrays["word_start"]
                flags = np.concatenate([[1], ws[slice(*p.tokens_a)], [1], ws[slice(*p.tokens_b)], [1]])
                word_start[row, : len(ids)] = torch.from_numpy(flags.astype(np.int64))
            labels[row] = p.label
        batch = {
            "input_ids": input_ids,
            "token_type_ids": token_type_ids,
            "attention_mask": attention_mask,
            "next_sentence_label": labels,
            "idx": torch.tensor(indices, dtype=torch.long),
        }
        if word_start is not None:
            batch["word_start"] = word_start
        return batch

    def __getitem__(self, i: int) -> dict:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}
