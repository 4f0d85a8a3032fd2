"""`toolkit` command line: a thin layer over the Python API.

The recipe verbs (pretrain, finetune, compare, compress) are declared once, in `RECIPE_VERBS`: each
names the public function it calls and the recipe class it reads, and every one takes the same
arguments (a recipe, key=value overrides, --dry-run, --help-recipe). Each result prints its own summary.
Heavy libraries are imported inside each command, so `toolkit --help` answers at once.
User errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

MODES = "frozen, full, prompt, prefix, ptuning, lora, qlora, cloze"
TASKS = (
    "movie-sentiment, movie-rating, sms-spam, question-type, amazon-sentiment, nyt-sentiment, tweet-sentiment, "
    "movie-dialog"
)
TASK_TYPES = "sequence_classification, regression, token_classification, question_answering, generation"


@dataclass(frozen=True)
class RecipeVerb:
    """A command that runs a recipe: `toolkit NAME RECIPE [key=value ...]`."""

    name: str
    help: str
    description: str
    run: str  # "module:function": (recipe, overrides=[...]) -> a result with .summary()
    recipe_class: str  # "module:Class" of the recipe it reads (for --help-recipe and --dry-run)
    example: str  # a shipped recipe
    dry_run: str | None = None  # "module:function": (recipe, overrides) -> text; default: the resolved recipe


RECIPE_VERBS = (
    RecipeVerb(
        "pretrain",
        "pretrain a model from a recipe",
        "Pretrain from a YAML recipe; override any key as key=value "
        "(e.g. training.max_steps=20 'data.train_files=[a.txt,b.txt]').",
        "toolkit.pretraining:pretrain",
        "toolkit.config:PretrainRecipe",
        "recipes/bert-mlm.yaml",
    ),
    RecipeVerb(
        "finetune",
        "fine-tune a checkpoint on labelled data",
        "Fine-tune a checkpoint folder on a labelled task from a YAML recipe; override any key as key=value "
        f"(e.g. finetune.mode=lora task.train_file=data.csv). Modes: {MODES}. Built-in tasks (task.name): {TASKS}. "
        f"Task types (task.type, inferred from the data when unset): {TASK_TYPES}.",
        "toolkit.finetuning.pipeline:finetune",
        "toolkit.finetuning.config:FinetuneRecipe",
        "recipes/finetune-full.yaml",
    ),
    RecipeVerb(
        "compare",
        "run several fine-tuning modes side by side",
        f"Fine-tune the same checkpoint on the same task and seed in each of compare.modes ({MODES}) and write a "
        "Markdown table, a CSV and a plot of validation accuracy against training time into output_dir.",
        "toolkit.finetuning.compare:compare",
        "toolkit.finetuning.config:FinetuneRecipe",
        "recipes/finetune-compare.yaml",
        dry_run="toolkit.finetuning.compare:describe_modes",
    ),
    RecipeVerb(
        "study",
        "compare pretraining objectives at equal compute on a task suite",
        "Pretrain each of study.objectives (random init, mlm, mlm+nsp, rtd, clm) on the suite's training texts to "
        "each fraction of study.max_flops, benchmark every checkpoint on the suite, and write study.md, study.csv "
        "and study.png; a killed study continues where it stopped.",
        "toolkit.studies:study",
        "toolkit.studies:StudyRecipe",
        "recipes/study-objectives.yaml",
    ),
    RecipeVerb(
        "compress",
        "quantize, prune or distill a model, with a size/speed/accuracy report",
        "Compress a model from a YAML recipe (compress.method: quantize, prune or distill) and write report.md, "
        "report.csv and report.png comparing parameters, size on disk, CPU latency and test quality with the "
        "original; override any key as key=value (e.g. compress.sparsity=0.7).",
        "toolkit.compression.pipeline:compress",
        "toolkit.compression.config:CompressRecipe",
        "recipes/compress-quantize.yaml",
    ),
)


def _load(target: str):
    import importlib

    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def _run_recipe(verb: RecipeVerb, args) -> None:
    import os

    from toolkit.config import recipe_help, resolve, to_yaml
    from toolkit.errors import ToolkitError

    cls = _load(verb.recipe_class)
    if args.help_recipe:
        print(recipe_help(cls))
        return
    if args.recipe is None:
        raise ToolkitError(f"give a recipe file, e.g. toolkit {verb.name} {verb.example}")
    if args.dry_run:
        text = _load(verb.dry_run)(args.recipe, args.overrides) if verb.dry_run else None
        print(text if text is not None else to_yaml(resolve(cls, args.recipe, args.overrides)), end="")
        return
    result = _load(verb.run)(args.recipe, overrides=args.overrides)
    if os.environ.get("RANK", "0") == "0":
        print(result.summary())


def _benchmark(args) -> None:
    from toolkit.benchmarking import benchmark

    result = benchmark(
        args.model, args.suite, args.seeds, args.modes, args.output_dir, args.overrides, args.against_random_init
    )
    if os.environ.get("RANK", "0") == "0":
        print(result.summary())


def _predict(args) -> None:
    from toolkit.finetuning.predict import predict

    verbalizer = None
    if args.verbalizer is not None:
        import yaml

        from toolkit.errors import ToolkitError

        try:
            verbalizer = yaml.safe_load(args.verbalizer)
        except yaml.YAMLError as e:
            raise ToolkitError(
                f"--verbalizer is not a YAML mapping ({str(e).splitlines()[0]}): write e.g. "
                "'{negative: terrible, positive: great}'"
            ) from None
    out, scores = predict(
        args.model,
        args.file,
        args.output,
        args.batch_size,
        args.text_fields,
        args.file_format,
        template=args.template,
        verbalizer=verbalizer,
        max_seq_length=args.max_seq_length,
        label_field=args.label_field,
    )
    print(f"predictions written to {out}")
    if scores:
        print(json.dumps(scores, indent=2))


def _tokenizer(args) -> None:
    from toolkit.data import corpus
    from toolkit.tokenizer import train_tokenizer

    files = corpus.expand(args.files, "--files")
    docs = corpus.load_documents(files, args.text_field, args.document_boundary)
    tok = train_tokenizer(docs["text"], args.kind, args.vocab_size, args.lowercase, args.min_frequency, args.max_length)
    tok.save_pretrained(args.output)
    print(f"trained a {args.kind} tokenizer with {len(tok)} tokens on {len(docs)} documents -> {args.output}")


def _report(args) -> None:
    from toolkit.report import write_report

    print(f"report written to {write_report(args.run_dir)}")


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

    for verb in RECIPE_VERBS:
        p = sub.add_parser(verb.name, help=verb.help, description=verb.description)
        p.add_argument("recipe", nargs="?", help=f"YAML recipe, e.g. {verb.example}")
        p.add_argument(
            "overrides", nargs="*", metavar="key=value", help="dotted recipe overrides, values parsed as YAML"
        )
        p.add_argument("--dry-run", action="store_true", help="print the resolved, validated recipe and stop")
        p.add_argument(
            "--help-recipe", action="store_true", help="list every recipe key with its default and meaning, and stop"
        )
        p.set_defaults(func=lambda args, verb=verb: _run_recipe(verb, args))

    p = sub.add_parser(
        "benchmark",
        help="fine-tune a checkpoint on a suite of tasks, several seeds",
        description="Fine-tune MODEL (a checkpoint folder) on every task of a suite with the same settings and "
        "several seeds, and write benchmark.md, .csv and .png: each task's test score (macro-F1; Pearson for "
        "regression) and the suite mean, mean and spread over seeds. Finished runs are read, not redone. "
        f"Built-in tasks: {TASKS}.",
    )
    p.add_argument("model", help="a checkpoint folder (or pkg://PACKAGE/path)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="fine-tuning recipe keys for every run")
    p.add_argument("--suite", help="suite YAML (default: recipes/suite-default.yaml)")
    p.add_argument("--seeds", type=int, help="seeds per task (default: the suite's, 3)")
    p.add_argument("--modes", nargs="+", help="fine-tuning modes, e.g. frozen full (default: the suite's, full)")
    p.add_argument("--output-dir", help="default: outputs/benchmark/<model folder name>")
    p.add_argument(
        "--against-random-init",
        action="store_true",
        help="also benchmark the same architecture with fresh weights and write vs-random-init.md, task by task",
    )
    p.set_defaults(func=_benchmark)

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
    p.add_argument(
        "--template",
        action="append",
        help="zero-shot prompt, e.g. '{text} It was {mask}.' (repeat to average several): MODEL may then be any "
        "masked or causal LM folder; needs --verbalizer",
    )
    p.add_argument(
        "--verbalizer", help="YAML mapping of each label to its word(s), e.g. '{negative: terrible, positive: great}'"
    )
    p.add_argument(
        "--max-seq-length", type=int, help="with --template: tokens per prompt (default: the model's, at most 512)"
    )
    p.add_argument("--label-field", help="column holding gold labels, for metrics (default: the recipe's, or 'label')")
    p.set_defaults(func=_predict)

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

    p = sub.add_parser(
        "report",
        help="redraw report.png of a run folder",
        description="Draw RUN_DIR/report.png (training and validation loss, learning rate, throughput and, where "
        "logged, loss against training FLOPs) from RUN_DIR/metrics.jsonl.",
    )
    p.add_argument("run_dir", help="the output_dir of a pretraining, fine-tuning or compression training run")
    p.set_defaults(func=_report)
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
