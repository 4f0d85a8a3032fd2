"""What every compression method shares: the input model and its data, the rows of the report measured
the same way, folders saved the same way, and training on the run harness (recovery, distillation)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from toolkit.compression import measure
from toolkit.compression.config import CompressRecipe
from toolkit.compression.measure import Row
from toolkit.errors import ToolkitError


@dataclass
class Subject:
    """What every row is measured on: the data, the timed batch, and the original model's outputs."""

    kind: str  # classifier | masked-lm | encoder
    tokenizer: object
    recipe: CompressRecipe
    data: object = None  # TaskData (classifiers)
    blocks: object = None  # validation blocks (masked LMs with a data section)
    train_blocks: object = None  # training blocks (masked-LM distillation)
    batch: dict = field(default_factory=dict)
    reference: dict = field(default_factory=dict)  # the first model's logits / outputs
    runners: dict = field(default_factory=dict)  # row name -> measure.Runner, kept for the timing

    def measure(self, name: str, model, folder, note: str = "") -> Row:
        """One row of the report (on the main process; the others, which only help train, get a blank)."""
        if not is_main():
            return Row(name=name, folder=str(folder), params=0, nonzero_params=0, size_bytes=0, latency_ms=0.0)
        r = self.recipe.report
        params, nonzero = measure.count_parameters(model)
        runner = measure.Runner(model, r.compile)
        row = Row(
            name=name,
            folder=str(folder),
            params=params,
            nonzero_params=nonzero,
            size_bytes=measure.weights_size(Path(folder)),
            latency_ms=0.0,  # set by time(), once every row is there
            note=note,
        )
        split = None if self.data is None else self.data.test if self.data.test is not None else self.data.validation
        if self.kind == "classifier" and split is not None:
            pad = self.tokenizer.pad_token_id
            length = self.recipe.task.max_seq_length
            result = measure.classification_metrics(
                runner, split, self.data.problem_type, pad, r.latency_batch_size, length
            )
            row.metrics.update(result["scores"])
            reference = self.reference.setdefault("logits", result["logits"])
            if self.data.problem_type != "regression":
                row.metrics["agreement"] = measure.agreement(reference, result["logits"])
        elif self.blocks is not None:
            row.metrics.update(measure.mlm_metrics(model, self.blocks, self.tokenizer, r.latency_batch_size))
        else:
            outputs = measure.outputs(runner, self.batch)
            reference = self.reference.setdefault("outputs", outputs)
            row.metrics["output_cosine"] = measure.cosine(reference, outputs, self.batch["attention_mask"])
        if runner.mode.startswith("eager ("):
            row.note = f"{row.note}; measured {runner.mode}" if row.note else f"measured {runner.mode}"
        self.runners[name] = runner
        print(f"measured {name}: " + describe(row.metrics))
        return row

    def time(self, rows: list[Row]) -> None:
        """CPU latency of every row's model, all timed in the same rounds (see measure.latencies_ms)."""
        if not self.runners:
            return
        latencies = measure.latencies_ms(self.runners, self.batch, self.recipe.report.latency_repeats)
        for row in rows:
            row.latency_ms = latencies.get(row.name, row.latency_ms)
            print(f"latency of {row.name}: {row.latency_ms:.1f} ms per batch")


def is_main() -> bool:
    """Whether this is the main process of the launch (or the only one). Read from the launcher's
    environment: the process group is set up by the training engine, with the launch checks."""
    return os.environ.get("RANK", "0") == "0"


# ---- loading the model and its data ---------------------------------------------------------------


def model_kind(config) -> tuple[str, object]:
    """(kind, transformers Auto class) of a checkpoint, from the architecture it was saved as."""
    import transformers

    arch = (getattr(config, "architectures", None) or [""])[0]
    if arch.endswith("ForSequenceClassification"):
        return "classifier", transformers.AutoModelForSequenceClassification
    if arch.endswith(("ForMaskedLM", "ForPreTraining")):
        return "masked-lm", transformers.AutoModelForMaskedLM
    return "encoder", transformers.AutoModel


def load_model(auto_class, folder: str, **kwargs):
    """A checkpoint in fp32 (models saved with their own code, such as mean-pooled classifiers, included)."""
    from toolkit.hf import quiet_transformers

    remote = "auto_map" in json.loads((Path(folder) / "config.json").read_text())
    with quiet_transformers():
        return auto_class.from_pretrained(folder, trust_remote_code=remote, **kwargs)


def subject_for(recipe: CompressRecipe, name: str, model_dir: str, kind: str, tokenizer) -> Subject:
    """The data the rows are measured on (checked against the model's labels) and the timed batch."""
    from toolkit.finetuning.tasks import load_task
    from toolkit.hf import quiet_datasets

    subject = Subject(kind=kind, tokenizer=tokenizer, recipe=recipe)
    task = recipe.task
    if kind == "classifier":
        if not (task.name or task.train_file):
            raise ToolkitError(
                f"'{name}' is a classifier: set task.name or task.train_file (the data it was fine-tuned on) so "
                "that the report can measure test accuracy"
            )
        with quiet_datasets():
            subject.data = load_task(task, tokenizer)
        check_labels(name, model_dir, subject.data)
    elif task.name or task.train_file:
        with quiet_datasets():
            subject.data = load_task(task, tokenizer)
    if kind == "masked-lm" and recipe.data.train_files:
        return mlm_subject(recipe, tokenizer)
    r = recipe.report
    length = r.latency_seq_length or task.max_seq_length
    subject.batch = measure.latency_batch(subject.data, tokenizer, r.latency_batch_size, length)
    return subject


def check_labels(name: str, model_dir: str, data) -> None:
    """The model's classes must be the task's, in the same order, or accuracy would be meaningless."""
    from toolkit.models import load_config

    config = load_config(model_dir, {})
    if data.problem_type == "regression":
        if config.num_labels != 1:
            raise ToolkitError(f"the task is a regression but '{name}' predicts {config.num_labels} classes")
        return
    names = [config.id2label[i] for i in range(config.num_labels)]
    if names != list(data.labels):
        raise ToolkitError(
            f"'{name}' predicts the classes {names} but the task has {list(data.labels)}: measure it on the task it "
            "was fine-tuned on (task.name / task.train_file / task.labels)"
        )


def load_input(recipe: CompressRecipe):
    from toolkit.models import load_config
    from toolkit.paths import resolve_path
    from toolkit.tokenizer import load_model_tokenizer

    model_dir = resolve_path(recipe.model.model_name_or_path)
    check_fine_tuned(model_dir, "model.model_name_or_path")
    tokenizer_dir = resolve_path(recipe.model.tokenizer_name_or_path) if recipe.model.tokenizer_name_or_path else None
    tokenizer = load_model_tokenizer(model_dir, tokenizer_dir)
    kind, auto_class = model_kind(load_config(model_dir, {}))
    return model_dir, tokenizer, kind, auto_class


def check_fine_tuned(folder: str, key: str) -> None:
    """A model folder that does not exist yet is most often the fine-tuning run not made yet: say so."""
    from toolkit.models import check_model_dir

    if not Path(folder).exists():
        raise ToolkitError(
            f"{key}: model folder '{folder}' does not exist; the shipped compression recipes read the output of "
            "toolkit finetune recipes/finetune-full.yaml: run that first, or point it at your model"
        )
    check_model_dir(folder)


def save(folder: Path, model, tokenizer, state_dict: dict | None = None) -> None:
    """An ordinary Hugging Face folder, written in full before it takes the final name (main process)."""
    from toolkit.engine.run import publish

    if not is_main():
        return

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp), state_dict=state_dict)
        tokenizer.save_pretrained(str(tmp))

    publish(folder, write)


def conditions(recipe: CompressRecipe, subject: Subject, extra: str) -> str:
    r = recipe.report
    b, length = subject.batch["input_ids"].shape
    where = f"{torch.get_num_threads()} CPU threads, " + (
        "compiled (torch.compile, inductor, frozen weights; compile time not counted)" if r.compile else "eager"
    )
    quality = (
        f"the {'test' if subject.data.test is not None else 'validation'} split of {subject.data.source}"
        if subject.kind == "classifier"
        else "masked-LM loss/accuracy on the validation blocks, the same masks for every model"
        if subject.blocks is not None
        else "output cosine similarity to the original model on the timed batch"
    )
    return (
        f"{extra} Latency: median of {r.latency_repeats} forward passes (after 3 warm-up passes; the models take "
        "turns, one pass each per round, so that changes in the machine's speed touch all alike) over one batch of "
        f"{b} examples x {length} tokens, fp32 inputs, {where}, inference mode. Size: the weight files on disk. "
        f"Params counts stored values (a 4-bit weight counts once per value). Quality: {quality}."
    )


def mlm_subject(recipe: CompressRecipe, tokenizer) -> Subject:
    from toolkit.data.blocks import prepare_blocks

    blocks = prepare_blocks(recipe.data, tokenizer, recipe.training.seed)
    if blocks.validation is None or len(blocks.validation) == 0:
        raise ToolkitError(
            "compress.objective=mlm needs validation text to measure the models on: set data.validation_files or "
            "data.validation_split_percentage > 0"
        )
    subject = Subject(kind="masked-lm", tokenizer=tokenizer, recipe=recipe, blocks=blocks.validation)
    subject.train_blocks = blocks.train
    r = recipe.report
    rows = blocks.validation.select(range(min(r.latency_batch_size, len(blocks.validation))))
    ids = torch.tensor(rows["input_ids"])
    subject.batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return subject


def train(recipe: CompressRecipe, training, objective, train_data, eval_data, tokenizer, folder: Path, name: str, save):
    """Train `objective` on the run harness (any launch; checkpoints with recipe.yaml in `folder/checkpoints`),
    then publish `folder` with `save(folder, objective, full state dict)` and the tokenizer. Returns the trained
    transformers model on the main process, None on the others."""
    from toolkit.engine import run as harness

    def setup(accelerator, resume) -> harness.Setup:
        return harness.Setup(
            objective=objective, tokenizer=tokenizer, train_data=train_data, eval_data=eval_data, save_model=save
        )

    outcome = harness.run(recipe, setup, training=training, output_dir=folder, name=name)
    return outcome.model.to("cpu").eval() if outcome.is_main else None


def weights(state_dict: dict) -> dict:
    """The transformers model's weights from the objective's full state dict."""
    return {k.removeprefix("model."): v.to("cpu") for k, v in state_dict.items() if k.startswith("model.")}


def describe(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)) or "-"
