"""Two-segment blocks for encoder objectives: `[CLS] A [SEP] B [SEP]`, as ELECTRA builds them.

Fine-tuning on sentence pairs feeds token type 1 to the second sentence; blocks of one segment
never train that embedding row. So, as google-research/electra's `build_pretraining_dataset.py`
does, every block is split at a sentence boundary into a segment A (token type 0, with [CLS] and
its [SEP]) and a segment B (type 1, with the final [SEP]):

- sentences come from the NSP sentence splitter (`pairs.split_sentences`, tokenized in batches by
  `pairs.tokenize_sentences`; a sentence longer than half a block is cut into pieces), and every
  document ends with a separator, as in one-segment blocks;
- a block is filled from the sentence stream up to its target length: `data.max_seq_length`, or
  with probability 0.05 a random length in [5, max_seq_length] (padded, ELECTRA's 5%);
- A takes sentences while it is shorter than half the block, and the sentence that would take it
  past half with probability 0.5 (ELECTRA's rule); B takes the rest. With probability 0.1 the
  block is one segment only (ELECTRA's "as in classification tasks").

Two things differ from ELECTRA, to keep the packing as dense as one-segment blocks: a block is cut
where its length runs out, mid-sentence if need be, and the rest of that sentence starts the next
block (ELECTRA drops it); and a block runs on across document ends (ELECTRA pads each document's
last example), with the document's separator in between. A separator that falls where a segment
ends *is* that segment's [SEP] (no doubled [SEP]); when it is the block's last token, the block
is one token short and padded. Once B has started, every further sentence goes to B (ELECTRA's loop
can put a short sentence back into A, out of order).

Blocks are stored as ids padded to `max_seq_length` with two numbers per block: `length` (tokens
before padding) and `segment_b` (where B starts; `length` when there is no B). `BlockDataset` turns
them into `token_type_ids` and, for batches with padding, an `attention_mask`. The layout is drawn
from a generator seeded by (seed, split), so the same recipe gives the same blocks.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from toolkit.data.loader import example_seed

SHORT_SEQ_PROB = 0.05  # ELECTRA: a random target length instead of max_seq_length
ONE_SEGMENT_PROB = 0.1  # ELECTRA: "a small chance to only have one segment as in classification tasks"
MIN_LENGTH = 5  # ELECTRA's shortest random target: [CLS] a [SEP] b [SEP]


def split_point(rng: random.Random, ends: np.ndarray, start: int, end: int, first_target: int) -> tuple[int, bool]:
    """Where segment A of stream range [start, end) ends: ELECTRA's rule over the sentence ends
    inside the range (A takes a sentence while it stays under `first_target` tokens, the one that
    crosses it with probability 0.5); B always keeps at least the last sentence. Returns
    (a_end, whether it is a sentence boundary)."""
    lo, hi = np.searchsorted(ends, start, side="right"), np.searchsorted(ends, end, side="left")
    if lo == hi:  # no sentence ends inside (only short blocks): cut at the target, inside a sentence
        a_end = start + max(1, min(first_target, end - start - 1))
        return a_end, False
    a_len, prev = 0, start
    for b in ends[lo:hi].tolist():
        length = b - prev
        if a_len == 0 or a_len + length < first_target or (a_len < first_target and rng.random() < 0.5):
            a_len, prev = a_len + length, b
        else:
            break
    return prev, True


def next_block(rng: random.Random, tokens: np.ndarray, ends: np.ndarray, start: int, max_len: int, sep: int):
    """The next block's layout in the stream from `start`: (a_end, end, a_sep, final_sep, one_segment,
    in_sentence, target) with A = [start, a_end), B = [a_end, end); `a_sep`/`final_sep`: the stream's
    own document separator ends A / the block. None when the rest of the stream cannot fill the block."""
    n = len(tokens)
    target = rng.randint(MIN_LENGTH, max_len) if rng.random() < SHORT_SEQ_PROB else max_len
    one = rng.random() < ONE_SEGMENT_PROB
    end = start + target - (2 if one else 3)
    if end > n:
        return None
    a_end, in_sentence, a_sep = end, False, False
    if not one:
        a_end, boundary = split_point(rng, ends, start, end, (target - 3) // 2)
        in_sentence = not boundary
        if tokens[a_end - 1] == sep:  # A ends with a document: its separator is A's [SEP]
            a_sep, end = True, end + 1
            if end > n:
                return None
    final_sep = False
    if tokens[end - 1] == sep and end - 1 > (start if one else a_end):
        final_sep = True  # the block ends with a document: its separator is the last [SEP] (one short)
    elif end < n and tokens[end] == sep:
        final_sep, end = True, end + 1  # the next token ends a document: it is the last [SEP]
    return a_end, end, a_sep, final_sep, one, in_sentence, target


def document_stream(batch, sep: int, word_starts: bool):
    """One Arrow batch of `pairs.tokenize_sentences` rows -> (tokens, word-start flags or None,
    sentence end offsets), each document's separator appended to its last sentence."""
    import pyarrow.compute as pc

    ids_col, lengths_col = batch.column("ids"), batch.column("lengths")
    per_doc_tokens = pc.list_value_length(ids_col).to_numpy(zero_copy_only=False).astype(np.int64)
    per_doc_sentences = pc.list_value_length(lengths_col).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = ids_col.flatten().to_numpy(zero_copy_only=False).astype(np.int32)
    lengths = lengths_col.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    kept = per_doc_sentences > 0  # documents with no token are skipped
    lengths[np.cumsum(per_doc_sentences)[kept] - 1] += 1  # the separator belongs to the last sentence
    at = np.cumsum(per_doc_tokens)[kept]
    tokens = np.insert(flat, at, sep)
    starts = None
    if word_starts:
        ws = batch.column("word_start").flatten().to_numpy(zero_copy_only=False).astype(np.int8)
        starts = np.insert(ws, at, 1)
    return tokens, starts, np.cumsum(lengths)


def pack(segments, tokenizer, max_seq_length: int, out_file: Path, word_starts: bool, seed: int, split: str) -> dict:
    """Lay the sentence stream out as two-segment blocks, written to an Arrow file."""
    import datasets
    from datasets.arrow_writer import ArrowWriter

    from toolkit.tokenizer import separator_id

    cls, sep, pad = tokenizer.cls_token_id, separator_id(tokenizer), tokenizer.pad_token_id
    pad = sep if pad is None else pad
    rng = random.Random(example_seed(seed, "segments", split))
    row = {"input_ids": datasets.List(datasets.Value("int32"), length=max_seq_length)}
    if word_starts:
        row["word_start"] = datasets.List(datasets.Value("int8"), length=max_seq_length)
    row.update(length=datasets.Value("int32"), segment_b=datasets.Value("int32"))
    stats = dict.fromkeys(["tokens", "blocks", "one_segment_blocks", "short_blocks", "padding", "split_in_sentence"], 0)

    tokens = np.empty(0, np.int32)
    starts = np.empty(0, np.int8) if word_starts else None
    ends = np.empty(0, np.int64)
    table = segments.data.table if hasattr(segments.data, "table") else segments.data
    with ArrowWriter(features=datasets.Features(row), path=str(out_file)) as writer:
        for batch in table.to_batches(max_chunksize=10_000):
            more, more_starts, more_ends = document_stream(batch, sep, word_starts)
            stats["tokens"] += len(more)
            ends = np.concatenate([ends, more_ends + len(tokens)])
            tokens = np.concatenate([tokens, more])
            if word_starts:
                starts = np.concatenate([starts, more_starts])
            out, pos = _blocks(rng, tokens, starts, ends, max_seq_length, cls, sep, pad, stats)
            if out["length"]:
                writer.write_batch({k: np.asarray(v) for k, v in out.items()})
            tokens, ends = tokens[pos:], ends[ends > pos] - pos  # the rest waits for the next batch
            starts = starts[pos:] if word_starts else None
        writer.finalize()
    stats["dropped_tokens"] = len(tokens)
    return stats


def _blocks(rng, tokens, starts, ends, max_len: int, cls: int, sep: int, pad: int, stats: dict):
    """Every block the stream can fill; returns the columns and the stream position after them."""
    out = {"input_ids": [], "length": [], "segment_b": []}
    if starts is not None:
        out["word_start"] = []
    pos = 0
    while (layout := next_block(rng, tokens, ends, pos, max_len, sep)) is not None:
        a_end, end, a_sep, final_sep, one, in_sentence, target = layout
        ids = np.full(max_len, pad, np.int32)
        flags = np.ones(max_len, np.int8)
        a = 1 + (a_end - pos)
        ids[0], ids[1:a] = cls, tokens[pos:a_end]
        if starts is not None:
            flags[1:a] = starts[pos:a_end]
        if not one and not a_sep:
            ids[a] = sep
            a += 1
        n = a + (end - a_end)
        ids[a:n] = tokens[a_end:end]
        if starts is not None:
            flags[a:n] = starts[a_end:end]
        if not final_sep:
            ids[n] = sep
            n += 1
        out["input_ids"].append(ids)
        out["length"].append(n)
        out["segment_b"].append(n if one else a)
        if starts is not None:
            out["word_start"].append(flags)
        stats["blocks"] += 1
        stats["one_segment_blocks"] += one
        stats["short_blocks"] += target < max_len
        stats["padding"] += max_len - n
        stats["split_in_sentence"] += in_sentence
        pos = end
    return out, pos
