"""Task types: what a fine-tuning run learns to produce, each a small plug-in.

    sequence_classification  one label per text (or text pair)        tasks.py + objective.py (as before)
    regression               one number per text                       the same, problem_type regression
    token_classification     one tag per word (NER, POS, chunking)     token_classification.py
    question_answering       an answer span in a context (SQuAD)       question_answering.py
    generation               a response to a prompt (causal LM, chat)  generation.py

A plug-in (`TaskType` in base.py) reads and tokenizes its data, names the Auto model class, builds
the objective the engine trains, computes its metrics, writes predictions and knows which modes it
can train with. `pipeline.py` dispatches on `task.type`; the engine, the modes and the outputs are
shared. `task.type` is inferred from the data's columns when the recipe leaves it unset.
"""

from __future__ import annotations

from toolkit.finetuning.types.rules import (  # noqa: F401  (the rules, read from here too)
    CLASSIFICATION,
    TAG_COLUMNS,
    TASK_TYPES,
    TYPE_MODES,
    check_mode,
    check_task_args,
    infer_type,
)


def resolve_type(task) -> str:
    """task.type, or the type inferred from the built-in task or the training file."""
    from pathlib import Path

    from toolkit.finetuning.tasks import BUILTIN_TASKS, read_table
    from toolkit.paths import resolve_path

    if task.type is not None:
        return task.type
    if task.name is not None:
        return BUILTIN_TASKS[task.name].task_type
    from toolkit.finetuning.types.question_answering import is_squad_json
    from toolkit.finetuning.types.token_classification import is_conll

    path = Path(resolve_path(task.train_file))
    if is_conll(path, task.file_format):
        return "token_classification"
    if is_squad_json(path):
        return "question_answering"
    table = read_table(task.train_file, task.file_format, "task.train_file")
    if hasattr(table, "keys"):
        table = next(iter(table.values()))
    return infer_type(table.column_names, task)


def load_any(task, tokenizer, kind: str | None = None) -> tuple[str, object, object]:
    """(type, plug-in or None, data) of any task: classification through tasks.py, the rest through
    their plug-ins."""
    import dataclasses

    from toolkit.finetuning.tasks import load_task

    kind = kind or resolve_type(task)
    if kind in CLASSIFICATION:
        if kind == "regression":
            task = dataclasses.replace(task, problem_type="regression")
        return kind, None, load_task(task, tokenizer)
    from toolkit.finetuning.types.base import load_data

    found = plugin(kind)
    return kind, found, load_data(found, task, tokenizer)


def plugin(task_type: str):
    """The plug-in object of a non-classification type."""
    if task_type == "token_classification":
        from toolkit.finetuning.types.token_classification import TokenClassification

        return TokenClassification()
    if task_type == "question_answering":
        from toolkit.finetuning.types.question_answering import QuestionAnswering

        return QuestionAnswering()
    if task_type == "generation":
        from toolkit.finetuning.types.generation import Generation

        return Generation()
    raise ValueError(task_type)
