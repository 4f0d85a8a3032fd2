"""Sentences of raw text, offline: splitting, and tokenizing documents sentence by sentence.

Read by next-sentence-prediction pairs (`pairs.py`) and by two-segment blocks (`segments.py`, via
`blocks.py`), which both cut documents at sentence boundaries.
"""

from __future__ import annotations

import re

import numpy as np

from toolkit.data import corpus
from toolkit.tokenizer import plain_backend

SPECIALS_PER_PAIR = 3  # [CLS] A [SEP] B [SEP]

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


def word_start_flags(word_ids: list) -> list[int]:
    w = np.array([-1 if i is None else i for i in word_ids], dtype=np.int64)
    starts = np.ones(len(w), dtype=np.int8)
    if len(w) > 1:
        starts[1:] = (w[1:] != w[:-1]) | (w[1:] < 0)
    return starts.tolist()


def tokenize_sentences(docs, tokenizer, max_seq_length: int, num_proc: int | None, word_starts: bool):
    """Per document: its tokens (`ids`), segment lengths (`lengths`), optional word-start flags."""
    backend = plain_backend(tokenizer)
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

    return corpus.map_documents(docs, encode, num_proc, "Splitting and tokenizing sentences")
