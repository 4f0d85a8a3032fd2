"""Pretraining, end to end: recipe -> tokenizer -> data -> objective -> engine -> outputs.

The objective prepares its own data (packed blocks by default, sentence pairs for NSP).
`pretrain(recipe, **overrides)` is the public function behind `toolkit pretrain`; it works the
same under `accelerate launch` (every process runs it; the main process builds the caches first).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from toolkit.config import PretrainRecipe, resolve
from toolkit.data import blocks as block_data
from toolkit.data import corpus
from toolkit.engine import run as harness
from toolkit.engine.run import Setup, metrics_summary
from toolkit.tokenizer import load_tokenizer, train_tokenizer


@dataclass
class PretrainResult:
    output_dir: Path
    metrics: dict  # final eval metrics ("eval_*"), the initial ones ("initial_eval_*"), train stats
    model: object = None  # the trained transformers model, in memory (sharded under ZeRO-3/FSDP, one stage's
    # weights under pipeline parallelism: load output_dir)

    def summary(self) -> str:
        return metrics_summary(self.output_dir, self.metrics)


def pretrain(recipe=None, overrides: list[str] | dict | None = None, **kwargs) -> PretrainResult:
    """Pretrain from a recipe (YAML path, dict or PretrainRecipe) with optional overrides.

    Overrides: dotted strings (`["training.max_steps=20"]`), or keywords
    (`training__max_steps=20`, `**{"training.max_steps": 20}`, `training={"max_steps": 20}`).
    """
    return run(resolve(PretrainRecipe, recipe, overrides, **kwargs))


def resolve_tokenizer(recipe: PretrainRecipe, resume: Path | None, documents):
    """Checkpoint's tokenizer on resume; else tokenizer.path; else the model's; else train (cached)."""
    if resume is not None:
        return load_tokenizer(resume)
    from toolkit.continuation import base_tokenizer, extend_tokenizer

    base = base_tokenizer(recipe)
    if base is not None:
        if not recipe.tokenizer.extend_vocab:
            return base
        train_docs, _ = documents()
        extended, added = extend_tokenizer(base, train_docs["text"], recipe.tokenizer.extend_vocab)
        shown = ", ".join(added[:8]) + (", ..." if len(added) > 8 else "")
        print(f"tokenizer.extend_vocab: {len(added)} words of the corpus added to the vocabulary ({shown})")
        return extended
    from toolkit.models import ARCHITECTURES

    tk, d = recipe.tokenizer, recipe.data
    kind = tk.kind or ARCHITECTURES[recipe.model.architecture].tokenizer_kind
    key = block_data.hash_key(
        {
            "files": corpus.fingerprint(corpus.expand(d.train_files)),
            "validation": corpus.fingerprint(corpus.expand(d.validation_files)) if d.validation_files else None,
            "split": [d.validation_split_percentage, recipe.training.seed],
            "reading": [d.text_field, d.document_boundary],
            "tokenizer": [kind, tk.vocab_size, tk.lowercase, tk.min_frequency, d.max_seq_length],
        }
    )
    cached = block_data.cache_root(d.cache_dir) / "tokenizers" / key
    if (cached / "tokenizer_config.json").is_file():
        return load_tokenizer(cached)
    train_docs, _ = documents()
    print(f"training a {kind} tokenizer ({tk.vocab_size} tokens) on {len(train_docs)} documents")
    tok = train_tokenizer(train_docs["text"], kind, tk.vocab_size, tk.lowercase, tk.min_frequency, d.max_seq_length)
    tmp = cached.with_name(f".{key}-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(str(tmp))
    shutil.rmtree(cached, ignore_errors=True)
    tmp.rename(cached)
    return load_tokenizer(cached)


def run(recipe: PretrainRecipe) -> PretrainResult:
    from toolkit.objectives import OBJECTIVES

    objective_cls = OBJECTIVES[recipe.objective.name]
    seed = recipe.training.seed

    def checks() -> None:
        d = recipe.data
        for f in corpus.expand(d.train_files, "data.train_files") + corpus.expand(
            d.validation_files, "data.validation_files"
        ):
            corpus.check_file(f)
        if recipe.model.model_name_or_path:
            from toolkit.models import check_model_dir
            from toolkit.paths import resolve_path

            check_model_dir(resolve_path(recipe.model.model_name_or_path))

    def setup(accelerator, resume) -> Setup:
        docs_cache: dict = {}

        def documents():
            if "docs" not in docs_cache:
                d = recipe.data
                validation = corpus.expand(d.validation_files) if d.validation_files else []
                docs_cache["docs"] = block_data.split_documents(d, seed, corpus.expand(d.train_files), validation)
                objective_cls.check_documents(recipe, *docs_cache["docs"])  # before any tokenizing
            return docs_cache["docs"]

        # the tokenizer and the objective's data: main process first, the others read its cache
        with accelerator.main_process_first():
            tokenizer = resolve_tokenizer(recipe, resume, documents)
            data = objective_cls.prepare_data(recipe, tokenizer, seed, documents)
        if accelerator.is_main_process:
            print(data.summary())
        from toolkit.card import write_model_card

        return Setup(
            objective=objective_cls.from_recipe(recipe, tokenizer),
            tokenizer=tokenizer,
            train_data=data.train,
            eval_data=data.validation,
            write_card=lambda folder, metrics: write_model_card(folder, recipe, data.stats, metrics),
        )

    outcome = harness.run(recipe, setup, name="pretrain", checks=checks)
    return PretrainResult(output_dir=outcome.output_dir, metrics=outcome.metrics, model=outcome.model)
