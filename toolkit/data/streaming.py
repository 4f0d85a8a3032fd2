"""Streaming corpora (`data.streaming: true`): read, tokenize and pack blocks on the fly.

No pass over the whole corpus and no cache of it: each process reads the files in a seeded
per-epoch order, keeps the documents that are its own (the n-th non-empty document of an epoch
belongs to process n % world_size, so the processes' shards are disjoint and cover the corpus),
tokenizes them a few at a time, appends a separator and cuts the token stream into blocks of
`max_seq_length` as `toolkit.data.blocks` does ([CLS] first for encoders). A shuffle buffer of
`data.shuffle_buffer` blocks mixes them: once full, each step emits the block at a slot drawn from
(seed, rank, blocks emitted) and puts the next block in its place.

Memory holds the buffer, the tokens of one batch of documents and one open file, whatever the
corpus size. The position is small and exact: per process the epoch, the file and its byte offset
after the last document read, the document counter, the leftover tokens, the buffer's contents and
the count of blocks emitted (which is also the buffer's random state). A resume seeks to the offset
and continues the same stream, so it sees exactly the batches the uninterrupted run would have, in
the time it takes to open a file (a `.gz` file is decompressed up to the offset, since gzip cannot
seek: split very large compressed corpora into several files).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from toolkit.data import corpus
from toolkit.data.blocks import block_prefix
from toolkit.data.loader import example_seed
from toolkit.errors import ToolkitError
from toolkit.tokenizer import plain_backend, separator_id

STATE_FILE = "data_stream.pt"  # beside each checkpoint: every process's stream position
DOCUMENTS_PER_READ = 64  # documents tokenized in one batched call


def read_documents(path: Path, offset: int, boundary: str, text_field: str):
    """(text, byte offset just after it) for each document of `path` from byte `offset` on.
    Plain text splits at blank lines, lines or not at all (`boundary`); `.jsonl` has one document
    per line in `text_field`. Offsets are of the decompressed bytes for `.gz` files."""
    fmt, gz = corpus.file_format(path)
    with (gzip.open if gz else open)(path, "rb") as fh:
        fh.seek(offset)
        if fmt == "text" and boundary == "file":
            if offset == 0:
                yield _decode(fh.read(), path, 0).strip(), fh.tell()
            return
        lines: list[str] = []
        while raw := fh.readline():
            where = fh.tell()
            if fmt == "json":
                if raw.strip():
                    try:
                        row = json.loads(raw)
                    except ValueError as e:
                        raise ToolkitError(f"cannot read '{path}' as JSON lines near byte {where}: {e}") from None
                    text = row.get(text_field) if isinstance(row, dict) else None
                    yield (text if isinstance(text, str) else "").strip(), where
            elif boundary == "line":
                yield _decode(raw, path, where).strip(), where
            elif raw.strip():
                lines.append(_decode(raw, path, where))
            elif lines:
                yield "".join(lines).strip(), where
                lines = []
        if lines:
            yield "".join(lines).strip(), fh.tell()


def _decode(raw: bytes, path: Path, where: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ToolkitError(f"'{path}' is not UTF-8 text near byte {where}: convert it to UTF-8 or remove it") from None


def check_streamable(files: list[Path]) -> None:
    for f in files:
        fmt, _ = corpus.file_format(f)
        if fmt not in ("text", "json") or (fmt == "json" and not f.name.lower().removesuffix(".gz").endswith(".jsonl")):
            raise ToolkitError(
                f"data.streaming reads plain text and .jsonl files (optionally .gz), not '{f}': convert it to "
                "JSON lines, or set data.streaming=false"
            )
        corpus.check_file(f)


class StreamingCorpus:
    """One process's endless stream of packed, shuffled blocks, with a saveable position."""

    streaming = True

    def __init__(
        self,
        files: list[Path],
        tokenizer,
        max_seq_length: int,
        *,
        document_boundary: str = "blank_line",
        text_field: str = "text",
        seed: int = 0,
        shuffle_buffer: int = 1000,
        world_size: int = 1,
        rank: int = 0,
    ):
        check_streamable(files)
        self.files, self.tokenizer, self.max_seq_length = list(files), tokenizer, max_seq_length
        self.boundary, self.text_field, self.seed = document_boundary, text_field, seed
        self.world_size, self.rank = world_size, rank
        self.prefix = np.array(block_prefix(tokenizer), dtype=np.int32)
        self.body = max_seq_length - len(self.prefix)
        self.sep = separator_id(tokenizer)
        self.backend = plain_backend(tokenizer)
        self.buffer = np.zeros((max(shuffle_buffer, 1), max_seq_length), dtype=np.int32)
        self.restore(None)

    # ---- position -------------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "files": [[str(f), f.stat().st_size] for f in self.files],
            "rank": self.rank,
            "epoch": self.epoch,
            "file": self.file,
            "offset": self.offset,
            "document": self.document,
            "emitted": self.emitted,
            "filled": self.filled,
            "carry": torch.from_numpy(self.carry.copy()),
            "buffer": torch.from_numpy(self.buffer[: self.filled].copy()),
        }

    def restore(self, state: dict | None) -> None:
        """Jump to a saved position (None: the start); reads nothing until the next block."""
        self.documents = None  # the open file's document reader, made at the next read
        if state is None:
            self.epoch = self.file = self.offset = self.document = self.emitted = self.filled = 0
            self.carry = np.empty(0, dtype=np.int32)
            return
        here = [[str(f), f.stat().st_size] for f in self.files]
        if state["files"] != here or state["rank"] != self.rank:
            raise ToolkitError(
                "cannot resume the streamed corpus: data.train_files (their names or sizes) changed since the "
                "checkpoint was written: resume with the same files, or start a new output_dir"
            )
        self.epoch, self.file, self.offset = state["epoch"], state["file"], state["offset"]
        self.document, self.emitted, self.filled = state["document"], state["emitted"], state["filled"]
        self.carry = state["carry"].numpy().astype(np.int32)
        self.buffer[: self.filled] = state["buffer"].numpy()

    def file_order(self, epoch: int) -> np.ndarray:
        """The files in a seeded order of their own each epoch (the same on every process)."""
        return np.random.default_rng(example_seed(self.seed, epoch, "files")).permutation(len(self.files))

    # ---- reading --------------------------------------------------------------------------------
    def next_document(self) -> str:
        """This process's next non-empty document (the n-th of an epoch goes to process n % world_size)."""
        while True:
            if self.file >= len(self.files):  # the end of an epoch: the next one, in its own file order
                if self.document < self.world_size:
                    raise ToolkitError(
                        f"the streamed corpus has {self.document} non-empty document(s), fewer than the "
                        f"{self.world_size} processes that share it: add text or use fewer processes"
                    )
                self.epoch, self.file, self.offset, self.document = self.epoch + 1, 0, 0, 0
            if self.documents is None:
                path = self.files[self.file_order(self.epoch)[self.file]]
                self.documents = read_documents(path, self.offset, self.boundary, self.text_field)
            item = next(self.documents, None)
            if item is None:
                self.documents, self.file, self.offset = None, self.file + 1, 0
                continue
            text, self.offset = item
            if not text:
                continue
            self.document += 1
            if (self.document - 1) % self.world_size == self.rank:
                return text

    def _read(self) -> None:
        """Tokenize this process's next few documents onto the leftover tokens."""
        texts = [self.next_document() for _ in range(DOCUMENTS_PER_READ)]
        encodings = self.backend.encode_batch(texts, add_special_tokens=False)
        self.carry = np.concatenate([self.carry, *(np.asarray(e.ids + [self.sep], dtype=np.int32) for e in encodings)])

    def _pack(self) -> np.ndarray:
        while len(self.carry) < self.body:
            self._read()
        block = np.concatenate([self.prefix, self.carry[: self.body]])
        self.carry = self.carry[self.body :]
        return block

    def next_block(self) -> np.ndarray:
        """The next block out of the shuffle buffer (filled first)."""
        size = len(self.buffer)
        while self.filled < size:
            self.buffer[self.filled] = self._pack()
            self.filled += 1
        slot = example_seed(self.seed, self.rank, self.emitted, "buffer") % size
        out = self.buffer[slot].copy()
        self.buffer[slot] = self._pack()
        self.emitted += 1
        return out

    def next_batch(self, batch_size: int) -> dict:
        """A micro-batch of `batch_size` blocks; `idx` numbers blocks uniquely across processes (masking
        is seeded by it)."""
        first = self.emitted
        blocks = np.stack([self.next_block() for _ in range(batch_size)])
        idx = torch.arange(first, first + batch_size, dtype=torch.long) * self.world_size + self.rank
        return {"input_ids": torch.from_numpy(blocks).long(), "idx": idx}


@dataclass
class StreamingData:
    """What `Objective.prepare_data` returns for a streamed corpus: the recipe of the stream (each
    process opens its own shard with `open`), validation blocks read the ordinary way."""

    files: list
    tokenizer: object
    data: object  # DataArgs
    seed: int
    validation: object | None
    stats: dict
    cache_hit: bool = False
    streaming: bool = True

    @property
    def train(self):
        return self

    def open(self, world_size: int, rank: int) -> StreamingCorpus:
        d = self.data
        return StreamingCorpus(
            self.files,
            self.tokenizer,
            d.max_seq_length,
            document_boundary=d.document_boundary,
            text_field=d.text_field,
            seed=self.seed,
            shuffle_buffer=d.shuffle_buffer,
            world_size=world_size,
            rank=rank,
        )

    def summary(self) -> str:
        s = self.stats
        text = (
            f"corpus (streamed): {len(self.files)} file(s), {s['train']['bytes']} bytes, blocks of "
            f"{s['max_seq_length']} tokens, shuffle buffer {self.data.shuffle_buffer}"
        )
        return text + (f"; validation {s['validation']['blocks']} blocks" if "validation" in s else "")


def prepare_stream(data, tokenizer, seed: int) -> StreamingData:
    """Check the training files (nothing is read in bulk) and build the validation blocks, if any,
    the ordinary way (tokenized once and cached)."""
    from dataclasses import replace

    from toolkit.data.blocks import prepare_blocks

    files = corpus.expand(data.train_files, "data.train_files")
    check_streamable(files)
    stats = {
        "max_seq_length": data.max_seq_length,
        "segments": 1,
        "train": {"bytes": sum(f.stat().st_size for f in files)},
    }
    validation = None
    if data.validation_files:
        only = replace(data, train_files=data.validation_files, validation_files=[], validation_split_percentage=0)
        blocks = prepare_blocks(only, tokenizer, seed)
        validation, stats["validation"] = blocks.train, blocks.stats["train"]
    return StreamingData(files, tokenizer, data, seed, validation, stats)


class StreamBatches:
    """The loop's micro-batch stream for a streamed corpus: this process's blocks, collated."""

    def __init__(self, corpus_stream: StreamingCorpus, batch_size: int, collator):
        self.stream, self.batch_size, self.collator = corpus_stream, batch_size, collator

    def __next__(self):
        return self.collator(self.stream.next_batch(self.batch_size))

    @property
    def epoch(self) -> int:
        return self.stream.epoch


def gather_positions(accelerator, stream: StreamingCorpus) -> list[dict]:
    """Every process's position, in process order (one collective; call on all processes)."""
    from accelerate.utils import gather_object

    return gather_object([stream.state()]) if accelerator.num_processes > 1 else [stream.state()]


def write_positions(folder: Path, positions: list[dict]) -> None:
    torch.save({"world_size": len(positions), "positions": positions}, Path(folder) / STATE_FILE)


def restore_position(stream: StreamingCorpus, checkpoint: Path) -> None:
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise ToolkitError(
            f"'{checkpoint}' holds no streamed-corpus position ({STATE_FILE}): it was written without "
            "data.streaming; resume with the settings it was written with, or start a new output_dir"
        )
    saved = torch.load(path, weights_only=True)
    # by data-parallel rank, not process index: under tensor parallelism a group of processes shares one stream
    stream.restore(next(p for p in saved["positions"] if p["rank"] == stream.rank))
