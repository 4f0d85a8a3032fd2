"""Streaming corpora (data.streaming): shards, exact and quick resume, flat memory, clear refusals;
and the block cache's token dtype."""

from __future__ import annotations

import gzip
import shutil
import time
import tracemalloc

import numpy as np
import pytest
import torch
from conftest import shakespeare_file, tiny_bert_recipe

import toolkit
from toolkit.data import corpus
from toolkit.data.streaming import STATE_FILE, StreamingCorpus, restore_position, write_positions
from toolkit.errors import ToolkitError
from toolkit.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(wordpiece_dir):
    return load_tokenizer(wordpiece_dir)


@pytest.fixture(scope="module")
def mixed_corpus(tmp_path_factory, corpus_dir):
    """The three plays: two plain, one gzipped, plus a .jsonl file (short documents)."""
    out = tmp_path_factory.mktemp("stream-corpus")
    plays = sorted(corpus_dir.iterdir())
    shutil.copy(plays[0], out / "a.txt")
    shutil.copy(plays[1], out / "b.txt")
    with gzip.open(out / "c.txt.gz", "wt", encoding="utf-8") as fh:
        fh.write(plays[2].read_text(encoding="utf-8"))
    lines = [line for line in plays[0].read_text(encoding="utf-8").splitlines() if line.strip()][:200]
    (out / "d.jsonl").write_text("".join(f'{{"text": "{line.replace(chr(34), "")}"}}\n' for line in lines))
    return corpus.expand([str(out)])


def _stream(files, tokenizer, **kw):
    return StreamingCorpus(files, tokenizer, 32, **{"seed": 3, "shuffle_buffer": 50, **kw})


def test_two_processes_read_disjoint_shards_that_cover_the_corpus(mixed_corpus, tokenizer):
    whole = _stream(mixed_corpus, tokenizer)
    every = []
    while whole.epoch == 0:
        every.append(whole.next_document())
    every.pop()  # the first document of epoch 1
    shards = []
    for rank in (0, 1):
        s = _stream(mixed_corpus, tokenizer, world_size=2, rank=rank)
        shards.append([s.next_document() for _ in range((len(every) + 1 - rank) // 2)])
        assert s.epoch == 0
    assert len(every) > 500
    assert shards[0] == every[0::2] and shards[1] == every[1::2]  # disjoint (by position) and complete
    assert sorted(shards[0] + shards[1]) == sorted(every)


def test_a_restored_stream_continues_with_exactly_the_same_batches(tmp_path, mixed_corpus, tokenizer):
    straight = _stream(mixed_corpus, tokenizer)
    expected = [straight.next_batch(16) for _ in range(110)]  # past one epoch: the files come round again
    assert straight.epoch >= 1
    first = _stream(mixed_corpus, tokenizer)
    for _ in range(70):
        first.next_batch(16)
    write_positions(tmp_path, [first.state()])
    resumed = _stream(mixed_corpus, tokenizer)
    restore_position(resumed, tmp_path)
    for k in range(70, 110):
        batch = resumed.next_batch(16)
        assert torch.equal(batch["input_ids"], expected[k]["input_ids"]), k
        assert torch.equal(batch["idx"], expected[k]["idx"])
    # the shuffle buffer does shuffle: the emitted blocks are not the packing order
    unshuffled = _stream(mixed_corpus, tokenizer, shuffle_buffer=1)
    assert not torch.equal(unshuffled.next_batch(16)["input_ids"], expected[0]["input_ids"])


def _big_corpus(folder, megabytes: int, file_kb: int = 256):
    """`megabytes` of Hamlet, repeated, in files of `file_kb` KiB."""
    text = shakespeare_file("hamlet_gut.txt").read_text(encoding="utf-8", errors="replace")
    folder.mkdir()
    chunk = (text * (file_kb * 1024 // len(text) + 1))[: file_kb * 1024]
    for i in range(megabytes * 1024 // file_kb):
        (folder / f"part{i:03d}.txt").write_text(chunk, encoding="utf-8")
    return corpus.expand([str(folder)])


def test_restoring_a_late_position_takes_no_longer_than_an_early_one(tmp_path, tokenizer):
    files = _big_corpus(tmp_path / "c", 1, file_kb=1024)  # one 1 MB file: a replay would read 600 KB
    stream = _stream(files, tokenizer)
    stream.next_batch(8)
    early = stream.state()
    while stream.offset < 600_000:  # deep into the file
        stream.next_batch(64)
    late = stream.state()

    def restore_seconds(state) -> float:
        fresh = _stream(files, tokenizer)
        start = time.perf_counter()
        fresh.restore(state)
        fresh.next_document()  # the seek and a read from the saved offset
        fresh.next_batch(8)
        return time.perf_counter() - start

    t_early = min(restore_seconds(early) for _ in range(3))
    t_late = min(restore_seconds(late) for _ in range(3))
    print(f"restore + first batch: early {t_early * 1000:.1f} ms, at byte {late['offset']}: {t_late * 1000:.1f} ms")
    assert t_late < 3 * t_early + 0.05


def test_reader_memory_is_flat_in_corpus_size(tmp_path, tokenizer):
    peaks = {}
    for mb in (2, 20):
        files = _big_corpus(tmp_path / f"c{mb}", mb)
        tracemalloc.start()
        stream = _stream(files, tokenizer, shuffle_buffer=200)
        for _ in range(60):  # 3840 blocks: more than one 256 KiB file's worth of text
            stream.next_batch(64)
        peaks[mb] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert stream.file >= 1
    print(
        f"reader peak (tracemalloc): 2 MB corpus {peaks[2] / 2**20:.2f} MiB, 20 MB corpus {peaks[20] / 2**20:.2f} MiB"
    )
    # stated bound: 10x the corpus adds less than 25% + 256 KiB to the reader's peak (a reader that held
    # the corpus would add 18 MB)
    assert peaks[20] < 1.25 * peaks[2] + 256 * 1024


def _streaming_recipe(out, corpus_dir, wordpiece_dir, **training):
    recipe = tiny_bert_recipe(out, corpus_dir, wordpiece_dir, **training)
    plays = sorted(corpus_dir.iterdir())
    recipe["data"].update(
        train_files=[str(p) for p in plays[:2]],
        validation_files=[str(plays[2])],
        validation_split_percentage=0,
        streaming=True,
        shuffle_buffer=64,
        segments=1,
    )
    recipe["model"]["config_overrides"].update(hidden_dropout_prob=0.1)  # the RNG state is restored too
    return recipe


def test_resumed_streaming_run_equals_the_uninterrupted_one(tmp_path, corpus_dir, wordpiece_dir):
    from safetensors.torch import load_file

    training = dict(max_steps=6, save_steps=3, save_total_limit=5, eval_steps=0, max_eval_batches=1)
    recipe = _streaming_recipe(tmp_path / "a", corpus_dir, wordpiece_dir, **training)
    full = toolkit.pretrain(recipe)
    losses = [m["loss"] for m in toolkit.engine.tracking.read_metrics(full.output_dir) if "loss" in m]
    weights = load_file(str(full.output_dir / "model.safetensors"))
    assert (full.output_dir / "checkpoints" / "checkpoint-3" / STATE_FILE).is_file()
    assert "streamed (data.streaming)" in (full.output_dir / "README.md").read_text()  # the model card says so

    shutil.rmtree(full.output_dir / "checkpoints" / "checkpoint-6")
    (full.output_dir / "model.safetensors").unlink()
    resumed = toolkit.pretrain(recipe, training__resume_from_checkpoint="auto")
    again = [m["loss"] for m in toolkit.engine.tracking.read_metrics(resumed.output_dir) if "loss" in m]
    assert again == losses  # exactly: the same batches, masks and dropout
    for k, v in load_file(str(resumed.output_dir / "model.safetensors")).items():
        assert torch.equal(v, weights[k]), k


def test_streaming_refuses_a_validation_split_percentage(tmp_path, corpus_dir, wordpiece_dir):
    recipe = _streaming_recipe(tmp_path / "x", corpus_dir, wordpiece_dir)
    recipe["data"].update(validation_files=[], validation_split_percentage=5)
    with pytest.raises(ToolkitError, match="give data.validation_files, or set data.validation_split_percentage=0"):
        toolkit.pretrain(recipe)
    recipe["data"].update(validation_split_percentage=0, segments=2)
    with pytest.raises(ToolkitError, match="set data.segments=1"):
        toolkit.pretrain(recipe)
    assert not (tmp_path / "x").exists()


def test_block_cache_stores_token_ids_as_uint16(tmp_path, corpus_dir, tokenizer):
    from dataclasses import replace

    from toolkit.config import DataArgs
    from toolkit.data.blocks import prepare_blocks
    from toolkit.data.loader import BlockDataset

    for segments in (1, 2):
        data = replace(DataArgs(), train_files=[str(corpus_dir)], max_seq_length=32, cache_dir=str(tmp_path))
        blocks = prepare_blocks(data, tokenizer, 0, segments=segments)
        assert blocks.train.features["input_ids"].feature.dtype == "uint16"
        n = len(blocks.train)
        assert (blocks.path / "train.arrow").stat().st_size < n * 32 * 3  # int32 would need 4 bytes a token
        batch = BlockDataset(blocks.train).__getitems__([0, n - 1])
        assert batch["input_ids"].dtype == torch.int64
        stored = np.array(blocks.train[[0, n - 1]]["input_ids"])
        assert torch.equal(batch["input_ids"], torch.from_numpy(stored.astype(np.int64)))
        assert batch["input_ids"].max() < len(tokenizer)
        assert (batch["input_ids"][:, 0] == tokenizer.cls_token_id).all()


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_process_streaming_run_resumes_exactly(tmp_path, corpus_dir, wordpiece_dir):
    import yaml
    from safetensors.torch import load_file
    from test_distributed import launch_two_processes

    from toolkit.engine.checkpoint import read_state
    from toolkit.engine.tracking import read_metrics

    training = dict(max_steps=6, save_steps=3, save_total_limit=5, eval_steps=0, max_eval_batches=1)
    path = tmp_path / "r.yaml"
    recipe = _streaming_recipe(tmp_path / "ddp", corpus_dir, wordpiece_dir, **training)
    path.write_text(yaml.safe_dump(recipe))
    first = launch_two_processes("pretrain", str(path))
    assert first.returncode == 0, first.stderr[-3000:]
    out = tmp_path / "ddp"
    assert read_state(out / "checkpoints" / "checkpoint-3")["world_size"] == 2
    positions = torch.load(out / "checkpoints" / "checkpoint-3" / STATE_FILE, weights_only=True)["positions"]
    assert [p["rank"] for p in positions] == [0, 1]
    assert not torch.equal(positions[0]["buffer"], positions[1]["buffer"])  # each process its own shard
    losses = [m["loss"] for m in read_metrics(out) if "loss" in m]
    weights = load_file(str(out / "model.safetensors"))

    shutil.rmtree(out / "checkpoints" / "checkpoint-6")
    (out / "model.safetensors").unlink()
    again = launch_two_processes("pretrain", str(path), "training.resume_from_checkpoint=auto")
    assert again.returncode == 0, again.stderr[-3000:]
    assert [m["loss"] for m in read_metrics(out) if "loss" in m] == losses
    for k, v in load_file(str(out / "model.safetensors")).items():
        assert torch.equal(v, weights[k]), k
