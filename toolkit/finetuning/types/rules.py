"""The rules of task types that a recipe is checked against before any data is read: which types
exist, which modes each can train with (and why not the others), and the inference of a type from a
table's columns. Below the plug-ins and the recipe classes, so that both can read it."""

from __future__ import annotations

from toolkit.errors import ToolkitError, check_choice

CLASSIFICATION = ("sequence_classification", "regression")
TASK_TYPES = (*CLASSIFICATION, "token_classification", "question_answering", "generation")
ALL_MODES = ("frozen", "full", "prompt", "prefix", "ptuning", "lora", "qlora", "cloze")
# Which modes each type can train with, and why the others cannot (the refusal's reason).
TYPE_MODES = {
    "sequence_classification": ALL_MODES,
    "regression": tuple(m for m in ALL_MODES if m != "cloze"),
    "token_classification": ("frozen", "full", "prefix", "ptuning", "lora", "qlora"),
    "question_answering": ("frozen", "full", "prefix", "ptuning", "lora", "qlora"),
    "generation": ("full", "prompt", "lora", "qlora"),
}
WHY_NOT = {
    "cloze": "cloze prompts score a verbalizer's label words: sentence classification only",
    "prompt": "prompt tuning prepends virtual tokens to the input, so per-token outputs no longer line up with "
    "the words (use prefix or ptuning, which P-tuning v2 showed for tagging and QA)",
    "frozen": "a frozen encoder with a head trained on cached features has nothing to train in a language model",
    "prefix": "prefix tuning is offered for the encoder types; for generation use prompt or lora",
    "ptuning": "P-tuning is offered for the encoder types; for generation use prompt or lora",
}


def check_mode(task_type: str, mode: str, key: str = "finetune.mode") -> None:
    if mode not in TYPE_MODES[task_type]:
        raise ToolkitError(
            f"{key}={mode} cannot train task.type={task_type}: {WHY_NOT.get(mode, 'not supported')}; use one of "
            f"{', '.join(TYPE_MODES[task_type])}"
        )


def check_task_args(recipe) -> None:
    """The recipe's task-type rules (called by FinetuneRecipe.validate; reads no data)."""
    from toolkit.finetuning.tasks import BUILTIN_TASKS

    task, f = recipe.task, recipe.finetune
    if task.type is not None:
        check_choice("task.type", task.type, TASK_TYPES)
    check_choice("task.entity_metrics", entity_metrics(task), ("auto", "true", "false"))
    kind = task.type
    if kind is None and task.name in BUILTIN_TASKS:
        kind = BUILTIN_TASKS[task.name].task_type
    if kind is not None:  # (each mode of a comparison is validated as its own recipe)
        check_mode(kind, f.mode)
    tp = recipe.training.tensor_parallel_size
    if kind == "generation" and tp > 1:  # the test split's generations run on the main process alone
        raise ToolkitError(
            f"training.tensor_parallel_size={tp} cannot fine-tune task.type=generation: its test generations run "
            "on the main process alone, which a model split across processes cannot do: set "
            "training.tensor_parallel_size=1"
        )
    if kind not in (None, *CLASSIFICATION) and f.pooling == "mean":
        raise ToolkitError(
            f"finetune.pooling=mean pools one vector per text, which task.type={kind} does not use: set "
            "finetune.pooling=cls"
        )
    if kind == "question_answering":
        check_doc_stride(task)
    if task.max_answer_length < 1 or task.n_best_size < 1:
        raise ToolkitError("task.max_answer_length and task.n_best_size must be at least 1")
    if task.max_new_tokens < 1 or task.num_beams < 1:
        raise ToolkitError("task.max_new_tokens and task.num_beams must be at least 1")
    if task.packing and f.mode == "prompt":
        raise ToolkitError(
            "task.packing cannot be used with prompt tuning (the virtual tokens would need a place in every packed "
            "example's mask): set task.packing=false"
        )


def entity_metrics(task) -> str:
    """task.entity_metrics as auto/true/false (a YAML boolean arrives in a text field as yes/no)."""
    value = str(task.entity_metrics).lower()
    return {"yes": "true", "no": "false"}.get(value, value)


def check_doc_stride(task) -> None:
    if task.doc_stride < 0 or task.doc_stride >= task.max_seq_length // 2:
        raise ToolkitError(
            f"task.doc_stride={task.doc_stride} must be at least 0 and below half of task.max_seq_length "
            f"({task.max_seq_length}): lower it"
        )


def infer_type(columns: list[str], task) -> str:
    """The type a table's columns imply (unambiguous layouts only; everything else classifies)."""
    cols = set(columns)
    if task.tokens_field in cols and (task.tags_field in cols or cols & set(TAG_COLUMNS)):
        return "token_classification"
    if {"question", "context", "answers"} <= cols:
        return "question_answering"
    if {task.prompt_field, task.response_field} <= cols or task.messages_field in cols:
        return "generation"
    return "sequence_classification"


TAG_COLUMNS = ("ner_tags", "tags", "pos_tags", "chunk_tags", "labels")
