"""Knowledge distillation on the shared training engine: a student learns from a teacher's soft targets.

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, labels)

(Hinton et al., 2015: the T^2 keeps the soft term's gradients on the scale of the hard term's as T
changes.) `ClassificationDistiller` distils a fine-tuned classifier on labelled examples;
`MaskedLMDistiller` distils a masked LM on raw text, at the masked positions. Both are ordinary
objectives of the engine, so distillation runs under every launch that fine-tuning runs under
(one process, DDP, DeepSpeed, FSDP) with the same checkpoints and exact resume. The teacher is held
outside the module tree: it is never trained, wrapped, sharded or written into checkpoints.

`build_student` makes the student: the starting checkpoint (model.model_name_or_path, or the
teacher itself) with only `compress.student_layers` of its encoder layers kept (DistilBERT's
initialisation from a subset of the teacher's layers), or a smaller config from
`compress.student_config`.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.data.examples import PaddedExamples
from toolkit.engine import flops
from toolkit.errors import ToolkitError
from toolkit.finetuning.objective import HEAD_MODULES, SequenceClassifier
from toolkit.objectives.mlm import MaskedLM, masked_lm_logits, mlm_flop_shapes, token_loss

# Config keys whose change alters weight shapes: a student with such overrides starts from random weights.
SHAPE_KEYS = ("hidden_size", "num_attention_heads", "intermediate_size", "vocab_size", "embedding_size", "n_embd")
LAYER_LISTS = ("encoder.layer", "transformer.h", "h", "transformer.layer", "layers", "encoder.layers")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher || student) of the temperature-softened distributions, summed over rows: zero
    exactly when the two agree, positive otherwise."""
    t = temperature
    log_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return t * t * F.kl_div(log_student, log_teacher, log_target=True, reduction="sum")


class _Teacher:
    """Holds the teacher outside the objective's module tree, on the batch's device, in eval mode."""

    def __init__(self, model: nn.Module):
        self.model = model.eval().requires_grad_(False)

    def to(self, device) -> nn.Module:
        if next(self.model.parameters()).device != device:
            self.model.to(device)
        return self.model


class ClassificationDistiller(SequenceClassifier):
    """A sequence classifier (the student) trained on the teacher's soft labels and the true labels."""

    name = "distill-classification"

    def __init__(self, student, teacher, args, problem_type: str, pad_id: int, max_len: int = 0):
        super().__init__(student, args, problem_type, pad_id, None, max_len)
        self.teacher = _Teacher(teacher)
        self.temperature = args.temperature
        self.loss_weights = {"kd": args.alpha, "task": 1.0 - args.alpha}

    def counts(self, batch):
        n = super().counts(batch)["task"]
        return {"task": n, "kd": n}

    @functools.cached_property
    def teacher_shapes(self) -> tuple[flops.Stack, int]:
        teacher = self.teacher.model
        return flops.stack_of(teacher, skip=HEAD_MODULES), flops.matmul_weights(teacher) - flops.matmul_weights(
            teacher, skip=HEAD_MODULES
        )

    def flops(self, batch):
        """The student's training pass and the teacher's forward pass (its head once per sequence)."""
        stack, head = self.teacher_shapes
        sequences, length, _ = flops.batch_shape(batch)
        return super().flops(batch) + flops.forward(stack, sequences, length) + flops.dense(head, sequences, 2)

    def forward(self, batch):
        student = self.logits(batch).float()
        losses, stats = self.score(student, batch["labels"])
        inputs = {k: batch[k] for k in PaddedExamples.COLUMNS if k in batch}
        with torch.no_grad():
            teacher = self.teacher.to(student.device)(**inputs).logits.float()
        if self.problem_type == "regression":  # the teacher's score is the soft target
            losses["kd"] = F.mse_loss(student.squeeze(-1), teacher.squeeze(-1), reduction="sum")
        else:
            losses["kd"] = kd_loss(student, teacher, self.temperature)
            stats["teacher_agree"] = (student.detach().argmax(-1) == teacher.argmax(-1)).sum()
        return losses, stats

    def metrics(self, totals):
        out = super().metrics(totals)
        if "teacher_agree" in totals:
            out["teacher_agreement"] = totals["teacher_agree"] / max(totals.get("count/kd", 0.0), 1.0)
        return out


class MaskedLMDistiller(MaskedLM):
    """A masked-LM student trained on the teacher's distributions at the masked positions."""

    name = "distill-mlm"

    def __init__(self, student, teacher, args, compress_args):
        super().__init__(student, args)
        self.teacher = _Teacher(teacher)
        self.temperature = compress_args.temperature
        self.loss_weights = {"kd": compress_args.alpha, "mlm": 1.0 - compress_args.alpha}

    def counts(self, batch):
        n = (batch["labels"] != -100).sum()
        return {"mlm": n, "kd": n}

    @functools.cached_property
    def teacher_shapes(self):
        return mlm_flop_shapes(self.teacher.model)

    def flops(self, batch):
        """The student's training pass and the teacher's forward pass (its head at the masked positions)."""
        stack, head, pooler = self.teacher_shapes
        sequences, length, masked = flops.batch_shape(batch)
        teacher = (
            flops.forward(stack, sequences, length) + flops.dense(head, masked, 2) + flops.dense(pooler, sequences, 2)
        )
        return super().flops(batch) + teacher

    def forward(self, batch):
        ids, labels, types = batch["input_ids"], batch["labels"], batch.get("token_type_ids")
        student = masked_lm_logits(self.model, ids, labels, types)
        with torch.no_grad():
            teacher = masked_lm_logits(self.teacher.to(ids.device), ids, labels, types)
        loss, correct = token_loss(student, labels[labels != -100])
        agree = (student.detach().argmax(-1) == teacher.argmax(-1)).sum()
        return {"mlm": loss, "kd": kd_loss(student, teacher, self.temperature)}, {
            "mlm_correct": correct,
            "teacher_agree": agree,
        }

    def metrics(self, totals):
        out = super().metrics(totals)
        out["teacher_agreement"] = totals.get("teacher_agree", 0.0) / max(totals.get("count/kd", 0.0), 1.0)
        return out


# ---- the student --------------------------------------------------------------------------------


def layer_indices(spec, available: int) -> list[int]:
    """compress.student_layers as indices: a count is spread evenly, first and last layer included."""
    if spec is None:
        return list(range(available))
    if isinstance(spec, int):
        if spec > available:
            raise ToolkitError(
                f"compress.student_layers={spec} but the starting checkpoint has only {available} layers"
            )
        if spec == 1:
            return [available - 1]
        return sorted({round(i * (available - 1) / (spec - 1)) for i in range(spec)})
    bad = [i for i in spec if i >= available]
    if bad:
        raise ToolkitError(
            f"compress.student_layers lists layer(s) {bad}, but the starting checkpoint has layers 0..{available - 1}"
        )
    return sorted(spec)


def layer_list(model) -> tuple[nn.Module, str]:
    """(parent module, attribute) of the model's list of transformer layers."""
    base = model.base_model
    for path in LAYER_LISTS:
        *parents, last = path.split(".")
        owner = base
        for part in parents:
            owner = getattr(owner, part, None)
            if owner is None:
                break
        if owner is not None and isinstance(getattr(owner, last, None), nn.ModuleList):
            return owner, last
    raise ToolkitError(
        f"compress.student_layers: cannot find the layer list of {type(model).__name__}; "
        "use compress.student_config={num_hidden_layers: N} instead (a student from random weights)"
    )


def keep_layers(model, indices: list[int]) -> None:
    """Keep only these transformer layers, in order; the config follows."""
    owner, attr = layer_list(model)
    layers = getattr(owner, attr)
    setattr(owner, attr, nn.ModuleList([layers[i] for i in indices]))
    for new_index, layer in enumerate(getattr(owner, attr)):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    config = model.config
    for key in ("num_hidden_layers", "n_layer"):
        if hasattr(config, key):
            setattr(config, key, len(indices))
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in indices]


def build_student(auto_class, source_dir: str, config, layers, overrides: dict):
    """(student, how it was made). `config` is the source's config with the task's labels applied."""

    from toolkit.models import ATTN_IMPLEMENTATION, apply_overrides

    layer_key = "num_hidden_layers" if hasattr(config, "num_hidden_layers") else "n_layer"
    shape_changed = sorted(k for k in overrides if k in SHAPE_KEYS and overrides[k] != getattr(config, k, None))
    if shape_changed:
        apply_overrides(config, overrides)
        if layers is not None:
            setattr(config, layer_key, len(layer_indices(layers, getattr(config, layer_key))))
        model = auto_class.from_config(config, attn_implementation=ATTN_IMPLEMENTATION)
        return model, f"random weights (compress.student_config changes {', '.join(shape_changed)})"
    apply_overrides(config, overrides)
    from toolkit.hf import quiet_transformers

    with quiet_transformers():
        model = auto_class.from_pretrained(source_dir, config=config, attn_implementation=ATTN_IMPLEMENTATION)
    available = getattr(model.config, layer_key)
    indices = layer_indices(layers, available)
    if len(indices) < available:
        keep_layers(model, indices)
    return model, f"layers {indices} of {source_dir} ({available} layers)"


def check_same_tokenizer(teacher_tok, student_tok, teacher_name: str, student_name: str, samples: list[str]) -> None:
    """The student reads the teacher's token ids: both tokenizers must map text to the same ids."""
    same_vocab = teacher_tok.get_vocab() == student_tok.get_vocab()
    same_ids = same_vocab and all(teacher_tok(s)["input_ids"] == student_tok(s)["input_ids"] for s in samples)
    if not same_ids:
        detail = (
            f"vocabularies of {len(teacher_tok)} and {len(student_tok)} tokens"
            if not same_vocab
            else "the same vocabulary, but different ids for the same text (casing or normalisation differs)"
        )
        raise ToolkitError(
            f"the teacher ({teacher_name}) and the student ({student_name}) tokenize text differently ({detail}): "
            "distillation needs one tokenizer; start the student from a checkpoint with the teacher's tokenizer "
            "(model.model_name_or_path) or leave it unset to cut the student from the teacher"
        )


def label_names(config) -> list[str]:
    return [config.id2label[i] for i in range(config.num_labels)]


# ---- the method: `toolkit compress` with compress.method=distill ----------------------------------


def run(recipe, out: Path):
    """A student trained with the teacher's soft targets (and, for comparison, the same student without)."""
    from toolkit.compression.subject import (
        check_fine_tuned,
        conditions,
        load_model,
        mlm_subject,
        model_kind,
        subject_for,
        train,
    )
    from toolkit.models import check_model_dir, load_config
    from toolkit.paths import resolve_path
    from toolkit.tokenizer import load_model_tokenizer

    c, t = recipe.compress, recipe.training
    teacher_dir = resolve_path(c.teacher)
    check_fine_tuned(teacher_dir, "compress.teacher")
    teacher_tok = load_model_tokenizer(teacher_dir)
    student_dir = resolve_path(recipe.model.model_name_or_path) if recipe.model.model_name_or_path else teacher_dir
    check_model_dir(student_dir)
    student_tok_dir = resolve_path(recipe.model.tokenizer_name_or_path) if recipe.model.tokenizer_name_or_path else None
    student_tok = load_model_tokenizer(student_dir, student_tok_dir) if student_dir != teacher_dir else teacher_tok
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
        student_config = student_classification_config(student_dir, teacher_config, subject.data, teacher_tok)
    else:
        subject = mlm_subject(recipe, teacher_tok)
        samples = [teacher_tok.decode(ids[:64], skip_special_tokens=True) for ids in subject.blocks["input_ids"][:16]]
        student_config = load_config(student_dir, {})
    check_same_tokenizer(teacher_tok, student_tok, c.teacher, recipe.model.model_name_or_path or c.teacher, samples)

    teacher = load_model(auto_class, teacher_dir)
    rows = [subject.measure("teacher", teacher, teacher_dir, f"the teacher, {c.teacher}")]
    models = {"teacher": teacher}
    variants = (["baseline"] if c.baseline else []) + ["student"]
    for variant in variants:
        from accelerate.utils import set_seed

        set_seed(t.seed)  # the same student initialisation for both
        student, how = build_student(
            auto_class, student_dir, copy.deepcopy(student_config), c.student_layers, c.student_config
        )
        objective = distill_objective(recipe, subject, student, teacher if variant == "student" else None)
        folder = out / variant
        train_data, eval_data = (
            (subject.data.train, subject.data.validation)
            if wanted == "classifier"
            else (subject.train_blocks, subject.blocks)
        )
        trained = train(recipe, t, objective, train_data, eval_data, teacher_tok, folder, f"distill-{variant}", _save)
        if trained is None:
            continue
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
    return title, conditions(recipe, subject, extra), rows, models


def _save(folder: Path, objective, state_dict: dict) -> None:
    """The student alone (the teacher is outside the objective's module tree)."""
    from toolkit.compression.subject import weights

    objective.model.save_pretrained(str(folder), state_dict=weights(state_dict))


def student_classification_config(student_dir: str, teacher_config, data, tokenizer):
    """The student's config with the teacher's classes; a student checkpoint that is already a classifier
    must predict the same classes."""
    from toolkit.compression.subject import model_kind
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


def distill_objective(recipe, subject, student, teacher):
    """The distillation objective (a teacher given), or the same student's plain objective (no teacher)."""
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
