"""Model cards: what was trained, on what, for how long, and how well."""

from __future__ import annotations

from pathlib import Path

from toolkit.config import to_yaml

USAGE = {
    "AutoModelForMaskedLM": """from transformers import pipeline
fill = pipeline("fill-mask", model="{path}")
print(fill("to be or not to be, that is the [MASK]."))""",
    "AutoModelForCausalLM": """from transformers import pipeline
generate = pipeline("text-generation", model="{path}")
print(generate("To be or not to be", max_new_tokens=20))""",
}


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def write_model_card(folder: Path, recipe, stats: dict, metrics: dict) -> None:
    from toolkit.objectives import OBJECTIVES

    objective = OBJECTIVES[recipe.objective.name]
    m, d, t = recipe.model, recipe.data, recipe.training
    source = (
        f"continued from `{m.model_name_or_path}`"
        if m.model_name_or_path
        else f"`{m.architecture}` size `{m.size}`, from scratch"
    )
    rows = []
    for key in sorted(k[len("eval_") :] for k in metrics if k.startswith("eval_")):
        before = metrics.get(f"initial_eval_{key}")
        rows.append(f"| {key} | {_fmt(before) if before is not None else '-'} | {_fmt(metrics['eval_' + key])} |")
    train = stats.get("train", {})
    lines = [
        f"# {Path(recipe.output_dir).name}",
        "",
        f"Pretrained with the `toolkit` ({objective.name} objective): {source}.",
        "",
        "## Data",
        f"- training files: {', '.join(map(str, d.train_files))}",
        f"- {train.get('documents', '?')} documents, {train.get('tokens', '?')} tokens, "
        + (
            f"packed into {train.get('blocks', '?')} blocks of {d.max_seq_length} tokens"
            + (" split at a sentence boundary into `[CLS] A [SEP] B [SEP]`" if stats.get("segments") == 2 else "")
            if "examples" not in train
            else f"{train['segments']} sentences -> {train['examples']} sentence pairs per epoch "
            f"({recipe.objective.pair_sampling}) of at most {d.max_seq_length} tokens"
        ),
        f"- validation: {', '.join(map(str, d.validation_files)) if d.validation_files else f'{d.validation_split_percentage}% of documents held out (seed {t.seed})'}",
        "",
        "## Training",
        f"- {metrics.get('steps')} optimizer steps, {metrics.get('tokens_seen')} tokens seen, "
        f"{metrics.get('train_seconds', 0):.0f} s on {metrics.get('world_size')} process(es)",
        f"- learning rate {t.learning_rate} ({t.lr_scheduler_type}), batch {t.per_device_train_batch_size} per process "
        f"x {t.gradient_accumulation_steps} accumulation, precision {t.mixed_precision}",
        "",
        "## Validation metrics",
        "| metric | before | after |",
        "| --- | --- | --- |",
        *rows,
        "",
        "## Use",
        "```python",
        (objective.usage or USAGE.get(objective.auto_class, "")).format(path=recipe.output_dir),
        "```",
        "",
        "## Recipe",
        "```yaml",
        to_yaml(recipe).rstrip(),
        "```",
        "",
    ]
    (folder / "README.md").write_text("\n".join(lines))
