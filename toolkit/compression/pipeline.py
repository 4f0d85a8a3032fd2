"""`toolkit compress`, end to end: recipe -> checks -> the model and its data -> compressed model(s) -> report.

    quantize  each of compress.schemes, applied as the model loads, saved, reloaded and measured
    prune     unstructured (global magnitude) or structured (heads and FFN neurons), optionally followed by
              recovery fine-tuning on the engine (pruned weights stay zero), made permanent, saved
    distill   a student trained on a teacher's soft targets on the engine (and, for comparison, the same
              student trained without a teacher on the same data and budget)

Every row of the report (the original model first) is measured the same way (`measure.py`). Outputs:
`output_dir/<model>/` (an ordinary Hugging Face folder per compressed model, with its tokenizer),
`report.md`, `report.csv`, `report.png`, `results.json` and the resolved `recipe.yaml`. The input
model is never modified: its full-precision weights stay the canonical ones.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from toolkit.compression import measure
from toolkit.compression.config import CompressRecipe
from toolkit.compression.measure import Row
from toolkit.config import load_recipe, to_yaml
from toolkit.errors import ToolkitError
from toolkit.finetuning.pipeline import combine_overrides

RESULTS_FILE = "results.json"


@dataclass
class CompressResult:
    output_dir: Path
    rows: list[Row]
    table: str
    markdown: Path
    csv: Path
    plot: Path | None
    models: dict = field(default_factory=dict)  # row name -> the model in memory


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
        print(f"measured {name}: " + _describe(row.metrics))
        return row

    def time(self, rows: list[Row]) -> None:
        """CPU latency of every row's model, all timed in the same rounds (see measure.latencies_ms)."""
        if not self.runners:
            return
        latencies = measure.latencies_ms(self.runners, self.batch, self.recipe.report.latency_repeats)
        for row in rows:
            row.latency_ms = latencies.get(row.name, row.latency_ms)
            print(f"latency of {row.name}: {row.latency_ms:.1f} ms per batch")


def resolve(recipe=None, overrides: list[str] | dict | None = None, **kwargs) -> CompressRecipe:
    """A validated CompressRecipe from a YAML path / dict / recipe plus overrides (as finetune takes them)."""
    return load_recipe(CompressRecipe, recipe, combine_overrides(overrides, kwargs))


def compress(recipe=None, overrides: list[str] | dict | None = None, **kwargs) -> CompressResult:
    """Compress a model from a recipe (YAML path, dict or CompressRecipe) with optional overrides, e.g.
    `compress("recipes/compress-prune.yaml", compress__sparsity=0.7)`."""
    return run(resolve(recipe, overrides, **kwargs))


def run(recipe: CompressRecipe) -> CompressResult:
    out = Path(recipe.output_dir)
    check_output_dir(out, recipe.training)
    c = recipe.compress
    if c.method == "quantize":
        from toolkit.compression.quantize import check_scheme

        for scheme in c.schemes:  # a library or hardware that cannot stops the run here
            check_scheme(scheme)
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    method = {"quantize": _quantize, "prune": _prune, "distill": _distill}[c.method]
    title, conditions, rows, models = method(recipe, out)
    if not is_main():  # the report is the main process's
        return CompressResult(out, rows, "", out / "report.md", out / "report.csv", None, models)
    from toolkit.compression import report

    out.mkdir(parents=True, exist_ok=True)
    table, md, csv_path, png = report.write(out, title, conditions, rows)
    (out / "recipe.yaml").write_text(to_yaml(recipe))
    results = {"method": c.method, "conditions": conditions, "rows": [report.flat(r, rows[0]) for r in rows]}
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    print("\n" + table + f"\n\nreport written to {md}, {csv_path}" + (f" and {png}" if png else ""))
    return CompressResult(out, rows, table, md, csv_path, png, models)


def is_main() -> bool:
    """Whether this is the main process of the launch (or the only one). Read from the launcher's
    environment: the process group is set up by the training engine, with the launch checks."""
    return os.environ.get("RANK", "0") == "0"


def check_output_dir(out: Path, t) -> None:
    """A new run must not silently mix with an old one in the same folder."""
    if not out.exists() or not any(out.iterdir()) or t.overwrite_output_dir or t.resume_from_checkpoint:
        return
    raise ToolkitError(
        f"output_dir '{out}' is not empty: start over with training.overwrite_output_dir=true, or choose another "
        "output_dir"
    )


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
    from toolkit.finetuning.modes import _quiet_transformers

    remote = "auto_map" in json.loads((Path(folder) / "config.json").read_text())
    with _quiet_transformers():
        return auto_class.from_pretrained(folder, trust_remote_code=remote, **kwargs)


def subject_for(recipe: CompressRecipe, name: str, model_dir: str, kind: str, tokenizer) -> Subject:
    """The data the rows are measured on (checked against the model's labels) and the timed batch."""
    from toolkit.finetuning.pipeline import _quiet_datasets
    from toolkit.finetuning.tasks import load_task

    subject = Subject(kind=kind, tokenizer=tokenizer, recipe=recipe)
    task = recipe.task
    if kind == "classifier":
        if not (task.name or task.train_file):
            raise ToolkitError(
                f"'{name}' is a classifier: set task.name or task.train_file (the data it was fine-tuned on) so "
                "that the report can measure test accuracy"
            )
        with _quiet_datasets():
            subject.data = load_task(task, tokenizer)
        check_labels(name, model_dir, subject.data)
    elif task.name or task.train_file:
        with _quiet_datasets():
            subject.data = load_task(task, tokenizer)
    if kind == "masked-lm" and recipe.data.train_files:
        return _mlm_subject(recipe, tokenizer)
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


def _load(recipe: CompressRecipe):
    from toolkit.finetuning.modes import load_tokenizer
    from toolkit.models import load_config
    from toolkit.paths import resolve_path

    model_dir = resolve_path(recipe.model.model_name_or_path)
    check_fine_tuned(model_dir, "model.model_name_or_path")
    tokenizer_dir = resolve_path(recipe.model.tokenizer_name_or_path) if recipe.model.tokenizer_name_or_path else None
    tokenizer = load_tokenizer(model_dir, tokenizer_dir)
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


def _save(folder: Path, model, tokenizer, state_dict: dict | None = None) -> None:
    """An ordinary Hugging Face folder, written in full before it takes the final name (main process)."""
    from toolkit.pretraining import publish

    if not is_main():
        return

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp), state_dict=state_dict)
        tokenizer.save_pretrained(str(tmp))

    publish(folder, write)


def _conditions(recipe: CompressRecipe, subject: Subject, extra: str) -> str:
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


# ---- quantize -------------------------------------------------------------------------------------


def _quantize(recipe: CompressRecipe, out: Path):
    from toolkit.compression.quantize import load_quantized, reload

    model_dir, tokenizer, kind, auto_class = _load(recipe)
    title = f"Quantization of {recipe.model.model_name_or_path}"
    if not is_main():  # nothing to train: the main process does it all
        return title, "", [], {}
    subject = subject_for(recipe, recipe.model.model_name_or_path, model_dir, kind, tokenizer)
    original = load_model(auto_class, model_dir)
    rows = [subject.measure("original", original, model_dir, "the full-precision input model (canonical weights)")]
    models = {"original": original}
    for scheme in recipe.compress.schemes:
        quantized = load_quantized(model_dir, scheme, auto_class)
        _save(out / scheme, quantized, tokenizer)
        del quantized
        reloaded = reload(out / scheme, auto_class)  # what is measured is what users load
        models[scheme] = reloaded
        rows.append(subject.measure(scheme, reloaded, out / scheme, NOTES[scheme]))
    subject.time(rows)
    return title, _conditions(recipe, subject, f"Schemes: {', '.join(recipe.compress.schemes)}."), rows, models


NOTES = {
    "int8_dynamic": "torchao int8 weights, int8 dynamic per-token activations; reload with "
    "AutoModel*.from_pretrained(folder, device_map='cpu') (torchao installed)",
    "bnb_8bit": "bitsandbytes LLM.int8() weights; reload with from_pretrained(folder) (bitsandbytes installed)",
    "bnb_4bit": "bitsandbytes NF4 weights, fp32 compute; reload with from_pretrained(folder) (bitsandbytes installed)",
}


# ---- prune ----------------------------------------------------------------------------------------


def _prune(recipe: CompressRecipe, out: Path):
    from toolkit.compression import prune, structured

    c = recipe.compress
    model_dir, tokenizer, kind, auto_class = _load(recipe)
    subject = subject_for(recipe, recipe.model.model_name_or_path, model_dir, kind, tokenizer)
    model = load_model(auto_class, model_dir)
    if c.structured:
        structured.check_structured(model)
    if c.recovery_epochs and kind != "classifier":
        raise ToolkitError(
            "compress.recovery_epochs fine-tunes on the task's labels, so it needs a classifier (a folder written by "
            f"toolkit finetune); '{recipe.model.model_name_or_path}' is a {kind}: set compress.recovery_epochs=0"
        )
    original = copy.deepcopy(model)  # measured as it is; `model` is pruned (and trained) in place
    rows = [subject.measure("original", original, model_dir, "the input model")]
    models = {"original": original}

    if c.structured:
        if c.importance_batches and kind == "classifier":
            scores = structured.importance_scores(model, _importance_batches(recipe, subject))
            how = f"first-order importance over {c.importance_batches} training batches"
        else:
            scores, how = structured.magnitude_scores(model), "weight magnitude"
        summary = structured.prune_structured(model, c.sparsity, scores)
        note = (
            f"structured: heads {summary['heads_before']} -> {summary['heads_after']} and FFN neurons "
            f"{summary['intermediate_before']} -> {summary['intermediate_after']} per layer, ranked by {how}"
        )
        save = _structured_saver(tokenizer)
    else:
        summary = prune.prune_global(model, c.sparsity)
        note = (
            f"unstructured: {summary['zeros']:,} of the {summary['pruned_weights']:,} encoder Linear weights "
            f"({summary['sparsity']:.1%}) zeroed by global magnitude"
        )
        save = _unstructured_saver(tokenizer)
    print(f"pruned: {note}")
    name = "pruned" if not c.structured else "pruned-structured"
    save(out / name, model)
    models[name] = _permanent(model)
    rows.append(subject.measure(name, models[name], out / name, note))

    if c.recovery_epochs:
        from toolkit.finetuning.objective import SequenceClassifier

        t = dataclasses.replace(recipe.training, num_train_epochs=c.recovery_epochs, max_steps=-1)
        data = subject.data
        objective = SequenceClassifier(
            model, c, data.problem_type, tokenizer.pad_token_id, None, recipe.task.max_seq_length
        )
        folder = out / f"{name}-recovered"
        trained, state = train_on_engine(t, objective, data.train, data.validation, tokenizer, folder, "recovery")
        if trained is not None:
            if c.structured:
                save(folder, trained)
            else:  # the gathered weights, masks folded in
                weights = prune.fold_masks({k.removeprefix("model."): v for k, v in state.items()})
                prune.make_permanent(trained)
                _save(folder, trained, tokenizer, weights)
            recovery = f"{note}; then {c.recovery_epochs:g} epoch(s) of fine-tuning"
            if not c.structured:
                recovery += (
                    f" with the pruned weights held at zero ({prune.sparsity_of(trained)['sparsity']:.1%} after)"
                )
            rows.append(subject.measure(f"{name}-recovered", trained, folder, recovery))
            models[f"{name}-recovered"] = trained
    title = f"Pruning of {recipe.model.model_name_or_path}"
    subject.time(rows)
    return title, _conditions(recipe, subject, f"Sparsity {c.sparsity:g}."), rows, models


def _permanent(model):
    """The model as it is saved: a copy, with the pruning masks folded in (the original keeps them)."""
    from toolkit.compression import prune

    if not any(n.endswith("_orig") for n, _ in model.named_parameters()):
        return copy.deepcopy(model)
    clone = type(model)(copy.deepcopy(model.config))  # (a model with masks attached cannot be deep-copied)
    clone.load_state_dict(prune.fold_masks(model.state_dict()))
    return clone.eval()


def _unstructured_saver(tokenizer):
    def save(folder: Path, model) -> None:
        _save(folder, _permanent(model), tokenizer)

    return save


def _structured_saver(tokenizer):
    from toolkit.compression.structured import save_pruned
    from toolkit.pretraining import publish

    def save(folder: Path, model) -> None:
        if not is_main():
            return

        def write(tmp: Path) -> None:
            save_pruned(model, tmp)
            tokenizer.save_pretrained(str(tmp))

        publish(folder, write)

    return save


def _importance_batches(recipe: CompressRecipe, subject: Subject):
    """Training batches with labels, for the importance estimate (a fixed, seeded sample)."""
    from toolkit.finetuning.objective import PaddedExamples

    data, t = subject.data, recipe.training
    examples = PaddedExamples(data.train, subject.tokenizer.pad_token_id)
    g = torch.Generator().manual_seed(t.seed)
    order = torch.randperm(len(examples), generator=g).tolist()
    size = t.per_device_train_batch_size
    for i in range(min(recipe.compress.importance_batches, len(order) // size)):
        batch = examples.__getitems__(order[i * size : (i + 1) * size])
        batch.pop("idx")
        yield batch


# ---- distill --------------------------------------------------------------------------------------


def _distill(recipe: CompressRecipe, out: Path):
    from toolkit.compression import distill
    from toolkit.finetuning.modes import load_tokenizer
    from toolkit.models import check_model_dir, load_config
    from toolkit.paths import resolve_path

    c, t = recipe.compress, recipe.training
    teacher_dir = resolve_path(c.teacher)
    check_fine_tuned(teacher_dir, "compress.teacher")
    teacher_tok = load_tokenizer(teacher_dir, None)
    student_dir = resolve_path(recipe.model.model_name_or_path) if recipe.model.model_name_or_path else teacher_dir
    check_model_dir(student_dir)
    student_tok_dir = resolve_path(recipe.model.tokenizer_name_or_path) if recipe.model.tokenizer_name_or_path else None
    student_tok = load_tokenizer(student_dir, student_tok_dir) if student_dir != teacher_dir else teacher_tok
    teacher_config = load_config(teacher_dir, {})
    kind, auto_class = model_kind(teacher_config)
    wanted = "classifier" if c.objective == "classification" else "masked-lm"
    if kind != wanted:
        hint = (
            "fine-tune it first (toolkit finetune), or set compress.objective=mlm for a masked LM"
            if wanted == "classifier"
            else "give a masked LM (the output of toolkit pretrain with objective mlm), or compress.objective="
            "classification for a classifier"
        )
        raise ToolkitError(f"compress.teacher '{c.teacher}' is a {kind}, not a {wanted}: {hint}")

    if wanted == "classifier":
        subject = subject_for(recipe, c.teacher, teacher_dir, kind, teacher_tok)
        samples = list(subject.data.train[subject.data.text_fields[0]][:32])
        student_config = _student_classification_config(student_dir, teacher_config, subject.data, teacher_tok)
    else:
        subject = _mlm_subject(recipe, teacher_tok)
        samples = [teacher_tok.decode(ids[:64], skip_special_tokens=True) for ids in subject.blocks["input_ids"][:16]]
        student_config = load_config(student_dir, {})
    distill.check_same_tokenizer(
        teacher_tok, student_tok, c.teacher, recipe.model.model_name_or_path or c.teacher, samples
    )

    teacher = load_model(auto_class, teacher_dir)
    rows = [subject.measure("teacher", teacher, teacher_dir, f"the teacher, {c.teacher}")]
    models = {"teacher": teacher}
    variants = (["baseline"] if c.baseline else []) + ["student"]
    for variant in variants:
        from accelerate.utils import set_seed

        set_seed(t.seed)  # the same student initialisation for both
        student, how = distill.build_student(
            auto_class, student_dir, copy.deepcopy(student_config), c.student_layers, c.student_config
        )
        objective = _distill_objective(recipe, subject, student, teacher if variant == "student" else None)
        folder = out / variant
        train_data, eval_data = (
            (subject.data.train, subject.data.validation)
            if wanted == "classifier"
            else (subject.train_blocks, subject.blocks)
        )
        trained, state = train_on_engine(t, objective, train_data, eval_data, teacher_tok, folder, f"distill-{variant}")
        if trained is None:
            continue
        _save(folder, trained, teacher_tok, {k.removeprefix("model."): v for k, v in state.items()})
        what = (
            f"student ({how}) trained with the teacher: alpha {c.alpha:g}, temperature {c.temperature:g}"
            if variant == "student"
            else f"the same student ({how}) trained without a teacher (labels only), same data, budget and seed"
        )
        rows.append(subject.measure(variant, trained, folder, what))
        models[variant] = trained
    budget = f"{t.num_train_epochs:g} epochs" if t.max_steps < 0 else f"{t.max_steps} steps"
    title = f"Distillation of {c.teacher}"
    extra = f"Training: {budget} at learning rate {t.learning_rate:g}, seed {t.seed}."
    subject.time(rows)
    return title, _conditions(recipe, subject, extra), rows, models


def _student_classification_config(student_dir: str, teacher_config, data, tokenizer):
    """The student's config with the teacher's classes; a student checkpoint that is already a classifier
    must predict the same classes."""
    from toolkit.compression.distill import label_names
    from toolkit.finetuning.modes import classification_config
    from toolkit.models import load_config

    source = load_config(student_dir, {})
    if model_kind(source)[0] == "classifier" and label_names(source) != label_names(teacher_config):
        raise ToolkitError(
            f"the teacher predicts {label_names(teacher_config)} but the student checkpoint predicts "
            f"{label_names(source)}: distillation needs the same label set; start the student from an encoder "
            "checkpoint or from the teacher"
        )
    return classification_config(student_dir, data, tokenizer, {})


def _mlm_subject(recipe: CompressRecipe, tokenizer) -> Subject:
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


def _distill_objective(recipe: CompressRecipe, subject: Subject, student, teacher):
    """The distillation objective (a teacher given), or the same student's plain objective (no teacher)."""
    from toolkit.compression.distill import ClassificationDistiller, MaskedLMDistiller
    from toolkit.config import ObjectiveArgs
    from toolkit.finetuning.objective import SequenceClassifier
    from toolkit.objectives.mlm import MaskedLM

    c, tok = recipe.compress, subject.tokenizer
    if subject.kind == "classifier":
        args = (subject.data.problem_type, tok.pad_token_id)
        if teacher is None:
            return SequenceClassifier(student, c, *args, None, recipe.task.max_seq_length)
        return ClassificationDistiller(student, teacher, c, *args, recipe.task.max_seq_length)
    if teacher is None:
        return MaskedLM(student, ObjectiveArgs())
    return MaskedLMDistiller(student, teacher, ObjectiveArgs(), c)


# ---- training on the shared engine ----------------------------------------------------------------


def train_on_engine(t, objective, train_data, eval_data, tokenizer, folder: Path, name: str):
    """Train `objective` with the engine (any launch), checkpoints in `folder`. Returns (the trained
    transformers model, its full state dict) on the main process and (None, None) on the others."""
    from accelerate.utils import set_seed

    from toolkit.engine import checkpoint
    from toolkit.engine.distributed import full_state_dict
    from toolkit.engine.loop import Job, make_accelerator, train

    resume = checkpoint.resolve_resume(folder, t.resume_from_checkpoint)
    folder.mkdir(parents=True, exist_ok=True)
    accelerator = make_accelerator(t, folder)
    set_seed(t.seed)
    job = Job(
        objective=objective,
        tokenizer=tokenizer,
        train_data=train_data,
        eval_data=eval_data,
        training=t,
        output_dir=folder,
        write_extras=lambda f: tokenizer.save_pretrained(str(f)),
        name=name,
    )
    _, model = train(job, accelerator, resume)
    state = full_state_dict(accelerator, model)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if not accelerator.is_main_process:
        return None, None
    trained = accelerator.unwrap_model(model).model
    return trained.to("cpu").eval(), {k: v.to("cpu") for k, v in state.items()}


def _describe(metrics: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)) or "-"
