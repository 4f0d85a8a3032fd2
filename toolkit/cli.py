"""`toolkit` command line: a thin layer over the Python API.

Heavy libraries are imported inside each command, so `toolkit --help` answers at once.
User errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys


def _pretrain(args) -> None:
    if args.dry_run:
        from toolkit.config import PretrainRecipe, load_recipe, to_yaml

        print(to_yaml(load_recipe(PretrainRecipe, args.recipe, args.overrides)), end="")
        return
    from toolkit.pretraining import pretrain

    result = pretrain(args.recipe, overrides=args.overrides)
    _print_summary(result.output_dir, result.metrics)


def _print_summary(output_dir, metrics: dict) -> None:
    import os

    if os.environ.get("RANK", "0") != "0":
        return
    print(f"\nsaved to {output_dir}")
    keys = ("loss", "perplexity", "mlm_accuracy", "next_token_accuracy", "nsp_accuracy")
    keys += ("generator_accuracy", "discriminator_accuracy", "replaced_precision", "replaced_recall")
    for key in keys:
        before, after = metrics.get(f"initial_eval_{key}"), metrics.get(f"eval_{key}")
        if after is not None:
            prefix = f"{before:.4f} -> " if before is not None else ""
            print(f"validation {key}: {prefix}{after:.4f}")


def _finetune(args) -> None:
    if args.dry_run:
        from toolkit.config import to_yaml
        from toolkit.finetuning.pipeline import resolve

        print(to_yaml(resolve(args.recipe, args.overrides)), end="")
        return
    from toolkit.finetuning.pipeline import finetune

    result = finetune(args.recipe, overrides=args.overrides)
    _print_finetune_summary(result.output_dir, result.metrics)


def _print_finetune_summary(output_dir, metrics: dict) -> None:
    import os

    if os.environ.get("RANK", "0") != "0":
        return
    print(f"\nsaved to {output_dir}")
    for key in ("loss", "accuracy", "macro_f1", "mcc", "pearson", "spearman"):
        before, after, test = (metrics.get(f"{p}_{key}") for p in ("initial_eval", "eval", "test"))
        if after is not None:
            prefix = f"{before:.4f} -> " if before is not None else ""
            print(f"validation {key}: {prefix}{after:.4f}" + (f"   test: {test:.4f}" if test is not None else ""))


def _predict(args) -> None:
    from toolkit.finetuning.predict import predict

    out, scores = predict(args.model, args.file, args.output, args.batch_size, args.text_fields, args.file_format)
    print(f"predictions written to {out}")
    if scores:
        print(json.dumps(scores, indent=2))


def _compare(args) -> None:
    from toolkit.finetuning.compare import compare, mode_recipes

    if args.dry_run:
        from toolkit.config import to_yaml

        for mode, recipe in mode_recipes(args.recipe, args.overrides)[1].items():
            print(f"# ---- mode {mode}\n{to_yaml(recipe)}", end="")
        return
    compare(args.recipe, overrides=args.overrides)


def _compress(args) -> None:
    from toolkit.compression.pipeline import compress, resolve

    if args.dry_run:
        from toolkit.config import to_yaml

        print(to_yaml(resolve(args.recipe, args.overrides)), end="")
        return
    compress(args.recipe, overrides=args.overrides)


def _tokenizer(args) -> None:
    from toolkit.data import corpus
    from toolkit.tokenizer import train_tokenizer

    files = corpus.expand(args.files, "--files")
    docs = corpus.load_documents(files, args.text_field, args.document_boundary)
    tok = train_tokenizer(docs["text"], args.kind, args.vocab_size, args.lowercase, args.min_frequency, args.max_length)
    tok.save_pretrained(args.output)
    print(f"trained a {args.kind} tokenizer with {len(tok)} tokens on {len(docs)} documents -> {args.output}")


def _evaluate(args) -> None:
    from toolkit.evaluation import evaluate_model

    metrics = evaluate_model(
        args.model, args.files, args.max_seq_length, args.batch_size, args.text_field, args.document_boundary
    )
    print(json.dumps(metrics, indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="toolkit", description="Pretrain and fine-tune BERT/GPT-style language models on your own text."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "pretrain",
        help="pretrain a model from a recipe",
        description="Pretrain from a YAML recipe; override any key as key=value "
        "(e.g. training.max_steps=20 'data.train_files=[a.txt,b.txt]').",
    )
    p.add_argument("recipe", help="YAML recipe, e.g. recipes/bert-mlm.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted recipe overrides, values parsed as YAML")
    p.add_argument("--dry-run", action="store_true", help="print the resolved, validated recipe and stop")
    p.set_defaults(func=_pretrain)

    modes = "frozen, full, prompt, prefix, ptuning, lora, qlora"
    tasks = "movie-sentiment, movie-rating, sms-spam"
    p = sub.add_parser(
        "finetune",
        help="fine-tune a checkpoint on labelled data",
        description=f"Fine-tune a checkpoint folder on a labelled task from a YAML recipe; override any key as "
        f"key=value (e.g. finetune.mode=lora task.train_file=data.csv). Modes: {modes}. Built-in tasks "
        f"(task.name): {tasks}.",
    )
    p.add_argument("recipe", help="YAML recipe, e.g. recipes/finetune-full.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted recipe overrides, values parsed as YAML")
    p.add_argument("--dry-run", action="store_true", help="print the resolved, validated recipe and stop")
    p.set_defaults(func=_finetune)

    p = sub.add_parser(
        "predict",
        help="label every row of a file with a fine-tuned model",
        description="Load a folder written by toolkit finetune (model or adapter) and write a prediction (and class "
        "probabilities) for every row of a CSV/TSV/JSON/JSONL/Parquet file; prints metrics when the file has labels.",
    )
    p.add_argument("model", help="a folder written by toolkit finetune")
    p.add_argument("file", help="the rows to label")
    p.add_argument("--output", help="output .csv or .jsonl (default: FILE-stem.predictions.csv here)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--text-fields", nargs="+", help="text column(s) (default: the ones the model was trained on)")
    p.add_argument("--file-format", choices=["csv", "tsv", "json", "parquet"], help="when the suffix does not tell")
    p.set_defaults(func=_predict)

    p = sub.add_parser(
        "compare",
        help="run several fine-tuning modes side by side",
        description=f"Fine-tune the same checkpoint on the same task and seed in each of compare.modes ({modes}) and "
        "write a Markdown table, a CSV and a plot of validation accuracy against training time into output_dir.",
    )
    p.add_argument("recipe", help="YAML recipe, e.g. recipes/finetune-compare.yaml")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted recipe overrides, e.g. 'compare.modes=[frozen,lora]'"
    )
    p.add_argument("--dry-run", action="store_true", help="print each mode's resolved recipe and stop")
    p.set_defaults(func=_compare)

    p = sub.add_parser(
        "compress",
        help="quantize, prune or distill a model, with a size/speed/accuracy report",
        description="Compress a model from a YAML recipe (compress.method: quantize, prune or distill) and write "
        "report.md, report.csv and report.png comparing parameters, size on disk, CPU latency and test quality "
        "with the original; override any key as key=value (e.g. compress.sparsity=0.7).",
    )
    p.add_argument("recipe", help="YAML recipe, e.g. recipes/compress-quantize.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted recipe overrides, values parsed as YAML")
    p.add_argument("--dry-run", action="store_true", help="print the resolved, validated recipe and stop")
    p.set_defaults(func=_compress)

    p = sub.add_parser("tokenizer", help="train a tokenizer on text files")
    p.add_argument("--files", nargs="+", required=True, help="text files, folders or globs")
    p.add_argument("--kind", choices=["wordpiece", "bpe"], default="wordpiece")
    p.add_argument("--vocab-size", type=int, default=30522)
    p.add_argument("--output", required=True, help="folder to save the tokenizer in")
    p.add_argument(
        "--lowercase", action=argparse.BooleanOptionalAction, default=True, help="lower-case text (WordPiece)"
    )
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("--max-length", type=int, default=512, help="model_max_length recorded in the tokenizer")
    p.add_argument("--text-field", default="text", help="column of .jsonl/.csv/.parquet files")
    p.add_argument("--document-boundary", choices=["blank_line", "line", "file"], default="blank_line")
    p.set_defaults(func=_tokenizer)

    p = sub.add_parser("evaluate", help="loss and perplexity of a pretrained model on text files")
    p.add_argument("--model", required=True, help="a model folder written by toolkit pretrain (or any HF MLM/CLM)")
    p.add_argument("--files", nargs="+", required=True, help="text files, folders or globs")
    p.add_argument("--max-seq-length", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--text-field", default="text")
    p.add_argument("--document-boundary", choices=["blank_line", "line", "file"], default="blank_line")
    p.set_defaults(func=_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    import os

    # A command-line run prints its own summary lines; library progress bars are noise there.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    # key=value overrides may come before or after options such as --dry-run
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    from toolkit.errors import ToolkitError

    try:
        args.func(args)
    except ToolkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
