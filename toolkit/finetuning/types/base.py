"""What every task type plug-in provides, and the parts they share: reading files into splits,
held-out splits, the model's config, predictions and the model card."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from toolkit.errors import ToolkitError


@dataclass
class TypeData:
    task_type: str
    train: object  # the tokenized features the objective reads
    validation: object | None
    test: object | None
    raw: dict  # split -> the examples as read (words and tags, question/context/answers, prompt/response)
    labels: list[str] | None  # tag names in id order (token_classification)
    source: str
    rows: dict = field(default_factory=dict)  # split -> examples
    notes: list[str] = field(default_factory=list)
    text_fields: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # type-specific facts (e.g. entity_metrics, has_no_answer)
    prompt_text: str | None = None  # the text that initialises prompt tuning

    @property
    def problem_type(self) -> str:
        return self.task_type

    @property
    def num_labels(self) -> int:
        return len(self.labels or ())

    def splits(self) -> dict:
        return {
            k: v
            for k, v in (("train", self.train), ("validation", self.validation), ("test", self.test))
            if v is not None
        }


class TaskType:
    """A task type: data -> features -> model -> objective -> metrics and predictions."""

    name: str
    auto_class: str  # the transformers Auto class of the output
    pipeline_task: str  # the transformers pipeline that runs the output
    main_metric: str  # the validation metric to report first
    text_fields: tuple = ()

    # ---- data ----
    def read(self, spec: str, task, what: str):
        """One file or folder -> a Dataset (or a dict of split -> Dataset) in this type's columns."""
        raise NotImplementedError

    def read_builtin(self, builtin, task):
        from toolkit.finetuning.tasks import read_table

        return builtin.prepare(read_table(builtin.train_file, builtin.file_format, f"task {task.name}"))

    def check(self, split: str, ds, task, where: str):
        """Check (and normalise) one split's examples; returns the Dataset to use."""
        return ds

    def prepare(self, raw: dict, task) -> dict:
        """Facts read from the training split (tag names...), stored in TypeData.extra / labels."""
        return {}

    def encode(self, ds, tokenizer, task, data: TypeData):
        """Examples -> features (tokenized, labelled)."""
        raise NotImplementedError

    # ---- model ----
    def model_config(self, model_dir: str, data: TypeData, tokenizer, overrides: dict):
        from toolkit.models import apply_overrides, load_config

        config = load_config(model_dir, {})
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = tokenizer.pad_token_id
        apply_overrides(config, overrides)
        return config

    def objective(self, model, recipe, data: TypeData, tokenizer):
        raise NotImplementedError

    def usage(self, path: str, adapter: str, base: str) -> str:
        """The exact code that loads and runs the output (model card, README); `adapter` is the PEFT
        mode of an adapter output, '' for a whole model."""
        raise NotImplementedError

    # ---- outputs ----
    def write_files(self, folder: Path, recipe, data: TypeData) -> None:
        """Files the output's loading code needs beside the saved model (after it is saved)."""

    def test_metrics(self, model, objective, data: TypeData, recipe, tokenizer, examples: dict) -> dict:
        """Extra test metrics computed after the test split's evaluation (generation decodes here)."""
        return {}

    def write_predictions(self, folder: Path, data: TypeData, examples: dict, objective) -> None:
        raise NotImplementedError

    def predict(self, model, tokenizer, recipe: dict, table, batch_size: int) -> tuple[list[dict], dict]:
        """Rows of the user's table with their predictions, and metrics when the table has references."""
        raise NotImplementedError


def load_data(kind: TaskType, task, tokenizer, seed: int | None = None) -> TypeData:
    """Read, check, split and tokenize the data of a non-classification task type."""
    from toolkit.finetuning.tasks import BUILTIN_TASKS, dict_splits

    seed = task.split_seed if seed is None else seed
    raw: dict = {}
    if task.name is not None:
        builtin = BUILTIN_TASKS[task.name]
        raw["train"] = kind.read_builtin(builtin, task)
        source = f"built-in task `{task.name}`: {builtin.description}"
    else:
        files = {"train": task.train_file, "validation": task.validation_file, "test": task.test_file}
        for split, spec in files.items():
            if not spec:
                continue
            table = kind.read(spec, task, f"task.{split}_file")
            if not isinstance(table, dict) and not hasattr(table, "keys"):
                raw[split] = table
                continue
            parts = dict_splits(table)
            if split == "train":
                if "train" not in parts:
                    raise ToolkitError(f"'{spec}' has no 'train' split (it has {', '.join(table.keys())})")
                raw.update({k: v for k, v in parts.items() if k not in raw})
            elif split in parts:
                raw[split] = parts[split]
            else:
                raise ToolkitError(f"task.{split}_file: '{spec}' has no '{split}' split")
        source = ", ".join(f"{k}: {v}" for k, v in files.items() if v)
    for split, ds in list(raw.items()):
        where = f"task {task.name}" if task.name else f"'{getattr(task, f'{split}_file', None) or task.train_file}'"
        raw[split] = kind.check(split, ds, task, where)
        if len(raw[split]) == 0:
            raise ToolkitError(f"the {split} split is empty ({where} has no usable rows)")
    raw = held_out(raw, task, seed)
    data = TypeData(kind.name, None, None, None, raw, None, source, rows={k: len(v) for k, v in raw.items()})
    data.text_fields = list(kind.text_fields)
    facts = kind.prepare(raw, task)
    data.labels = facts.pop("labels", None)
    data.prompt_text = facts.pop("prompt_text", None)
    data.notes += facts.pop("notes", [])
    data.extra.update(facts)
    if tokenizer is not None:
        for split, ds in raw.items():
            setattr(data, split, kind.encode(ds, tokenizer, task, data))
            if len(getattr(data, split)) == 0:
                raise ToolkitError(f"the {split} split has no examples after tokenizing")
    return data


def held_out(raw: dict, task, seed: int) -> dict:
    """Validation/test splits held out of the training rows by seed (when not given), then subsampling
    (tasks.hold_out, unstratified: these types have no one label per row)."""
    from toolkit.finetuning.tasks import hold_out

    raw = hold_out(raw, task, seed)
    return {k: raw[k] for k in ("train", "validation", "test") if k in raw}


def pad_rows(rows: list[list[int]], width: int, fill: int):
    import torch

    out = torch.full((len(rows), width), fill, dtype=torch.long)
    for r, seq in enumerate(rows):
        out[r, : len(seq)] = torch.tensor(seq[:width], dtype=torch.long)
    return out


def write_type_card(folder: Path, recipe, kind: TaskType, data: TypeData, metrics: dict, model_dir: str) -> None:
    """README.md of a non-classification output: what it is, how it was trained, how to load it."""
    from toolkit.finetuning.config import PEFT_MODES

    f, task = recipe.finetune, recipe.task
    adapter = f.mode in PEFT_MODES
    shown = {k: v for k, v in sorted(metrics.items()) if k.startswith(("eval_", "test_")) and isinstance(v, float)}
    lines = [
        "---",
        "library_name: peft" if adapter else "library_name: transformers",
        f"pipeline_tag: {kind.pipeline_task}",
        "---",
        f"# {kind.name.replace('_', ' ')}: fine-tuned with toolkit ({f.mode})",
        "",
        f"- base checkpoint: `{recipe.model.model_name_or_path}`",
        f"- task type `{kind.name}`, {'a PEFT adapter' if adapter else f'a complete `{kind.auto_class}` model'}",
        f"- data: {data.source}",
        f"- rows: {', '.join(f'{k} {v}' for k, v in data.rows.items())}; up to {task.max_seq_length} tokens",
    ]
    if data.labels:
        lines.append(f"- {len(data.labels)} tags: {', '.join(data.labels)}")
    lines += [f"- note: {n}" for n in data.notes]
    lines += ["", "## Results", "", "| metric | value |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.4f} |" for k, v in shown.items()]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        kind.usage(".", f.mode if adapter else "", str(Path(model_dir).resolve())),
        "```",
        "",
    ]
    (folder / "README.md").write_text("\n".join(lines))
