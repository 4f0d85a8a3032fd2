"""Pretraining, end to end: recipe -> tokenizer -> data -> objective -> engine -> outputs.

The objective prepares its own data (packed blocks by default, sentence pairs for NSP).
`pretrain(recipe, **overrides)` is the public function behind `toolkit pretrain`; it works the
same under `accelerate launch` (every process runs it; the main process builds the caches first).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from toolkit.config import PretrainRecipe, load_recipe, normalize_overrides, to_dict, to_yaml
from toolkit.data import blocks as block_data
from toolkit.data import corpus
from toolkit.engine import outputs
from toolkit.errors import ToolkitError
from toolkit.tokenizer import load_tokenizer, train_tokenizer


@dataclass
class PretrainResult:
    output_dir: Path
    metrics: dict  # final eval metrics ("eval_*"), the initial ones ("initial_eval_*"), train stats
    model: object = None  # the trained transformers model, in memory (sharded under ZeRO-3/FSDP: load output_dir)


def pretrain(recipe=None, overrides: list[str] | dict | None = None, **kwargs) -> PretrainResult:
    """Pretrain from a recipe (YAML path, dict or PretrainRecipe) with optional overrides.

    Overrides: dotted strings (`["training.max_steps=20"]`), or keywords
    (`training__max_steps=20`, `**{"training.max_steps": 20}`, `training={"max_steps": 20}`).
    """
    merged = normalize_overrides(kwargs)
    if isinstance(overrides, list):
        from toolkit.config import merge, parse_overrides

        merged = merge(parse_overrides(overrides), merged)
    elif overrides:
        from toolkit.config import merge

        merged = merge(normalize_overrides(overrides), merged)
    return run(load_recipe(PretrainRecipe, recipe, merged))


def check_output_dir(out: Path, resume: Path | None, t) -> None:
    """A new run must not silently mix with an old one in the same folder."""
    if resume is not None or not out.exists():
        return
    owned = [p for p in ("checkpoints", "metrics.jsonl", "runs") if (out / p).exists()]
    if not owned:
        return
    if not t.overwrite_output_dir:
        raise ToolkitError(
            f"output_dir '{out}' already holds a run: continue it with training.resume_from_checkpoint=auto, "
            "start over with training.overwrite_output_dir=true, or choose another output_dir"
        )


def resolve_tokenizer(recipe: PretrainRecipe, resume: Path | None, documents):
    """Checkpoint's tokenizer on resume; else tokenizer.path; else the model's; else train (cached)."""
    if resume is not None:
        return load_tokenizer(resume)
    if recipe.tokenizer.path:
        return load_tokenizer(recipe.tokenizer.path)
    src = recipe.model.model_name_or_path
    if src and (Path(src) / "tokenizer_config.json").is_file():
        return load_tokenizer(src)
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
    from accelerate.utils import set_seed

    from toolkit.engine.distributed import full_state_dict
    from toolkit.engine.loop import Job, make_accelerator, train
    from toolkit.objectives import OBJECTIVES

    t, out = recipe.training, Path(recipe.output_dir)
    # ---- every check that can fail on user input runs before any work or any file is written ---
    resume = outputs.prepare(out, t)  # writable, the checkpoint to resume from, no mixing of runs
    for f in corpus.expand(recipe.data.train_files, "data.train_files") + corpus.expand(
        recipe.data.validation_files, "data.validation_files"
    ):
        corpus.check_file(f)
    if recipe.model.model_name_or_path:
        from toolkit.models import check_model_dir

        check_model_dir(recipe.model.model_name_or_path)

    accelerator = make_accelerator(t, out)
    set_seed(t.seed)
    objective_cls = OBJECTIVES[recipe.objective.name]

    # ---- tokenizer and the objective's data (main process first: the others read the cache) ----
    docs_cache: dict = {}

    def documents():
        if "docs" not in docs_cache:
            d = recipe.data
            docs_cache["docs"] = block_data.split_documents(
                d, t.seed, corpus.expand(d.train_files), corpus.expand(d.validation_files) if d.validation_files else []
            )
            objective_cls.check_documents(recipe, *docs_cache["docs"])  # before any tokenizing
        return docs_cache["docs"]

    with accelerator.main_process_first():
        tokenizer = resolve_tokenizer(recipe, resume, documents)
        data = objective_cls.prepare_data(recipe, tokenizer, t.seed, documents)
    if accelerator.is_main_process:
        print(data.summary())

    # ---- model and objective; the shared engine trains it --------------------------------------
    objective = objective_cls.from_recipe(recipe, tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    if resume is None and t.overwrite_output_dir and accelerator.is_main_process:
        for p in ("checkpoints", "runs"):
            shutil.rmtree(out / p, ignore_errors=True)

    def write_extras(folder: Path) -> None:
        (folder / "recipe.yaml").write_text(to_yaml(recipe))
        tokenizer.save_pretrained(str(folder))

    job = Job(
        objective=objective,
        tokenizer=tokenizer,
        train_data=data.train,
        eval_data=data.validation,
        training=t,
        output_dir=out,
        write_extras=write_extras,
        tracker_config=_flat(to_dict(recipe)),
    )
    history, model = train(job, accelerator, resume)

    # ---- outputs: ordinary Hugging Face folders + recipe + model card ---------------------------
    metrics = _final_metrics(history)
    # full-size weights from ZeRO-3 / FSDP shards (every process takes part), fp32 under DeepSpeed
    state_dict = full_state_dict(accelerator, model)
    if accelerator.is_main_process:
        from toolkit.card import write_model_card

        def write_final(folder: Path) -> None:
            accelerator.unwrap_model(model).save_pretrained(folder, state_dict=state_dict)
            write_extras(folder)
            write_model_card(folder, recipe, data.stats, metrics)

        publish(out, write_final)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    trained = accelerator.unwrap_model(model).model
    return PretrainResult(output_dir=out, metrics=metrics, model=trained)


def publish(out: Path, write) -> None:
    """Write the final files into a temporary folder, then move them into place."""
    tmp = out / ".tmp-final"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    outputs.follow_umask(tmp)  # safetensors writes its files 0600
    for entry in sorted(tmp.iterdir()):
        target = out / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        entry.replace(target)
    tmp.rmdir()


def _final_metrics(history: dict) -> dict:
    facts = ("steps", "tokens_seen", "train_seconds", "world_size", "engine", "optimizer")
    metrics = {k: history[k] for k in facts + ("skipped_nonfinite_steps", "skipped_loss_scaler_steps") if k in history}
    metrics.update({f"train_{k}": v for k, v in history.get("train", {}).items()})
    metrics.update({f"eval_{k}": v for k, v in history.get("eval", {}).items()})
    metrics.update({f"initial_eval_{k}": v for k, v in history.get("initial", {}).items()})
    return metrics


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
