"""Typed recipes.

A recipe is a tree of dataclasses; YAML is only its serialization. Values resolve as
defaults < YAML file < command-line overrides (`training.max_steps=20`, parsed as YAML).
An unknown key is an error that names the nearest valid key, and cross-field rules are checked
in `validate()` before any data is read.

Field help lives in `field(metadata={"help": ...})`, as in `transformers.TrainingArguments`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from toolkit.errors import ToolkitError


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


# --------------------------------------------------------------------------------------------
# Sections shared by every command
# --------------------------------------------------------------------------------------------


@dataclass
class ModelArgs:
    """Which model to train: built from a size preset, or continued from a checkpoint folder."""

    architecture: str = _help("Model family built from scratch: bert, gpt2 or electra.", default="bert")
    size: str = _help("Size preset (BERT family dimensions): tiny, mini, small, medium, base, large.", default="mini")
    model_name_or_path: str | None = _help(
        "A local Hugging Face checkpoint folder to continue from instead of a fresh model.", default=None
    )
    config_overrides: dict = _help(
        "Mapping merged into the transformers config, e.g. {hidden_dropout_prob: 0.0}.",
        default_factory=dict,
    )


@dataclass
class TrainingArgs:
    """The shared training engine: batch, optimizer, schedule, precision, evaluation, checkpoints."""

    max_steps: int = _help("Optimizer steps to train for; -1 means use num_train_epochs.", default=-1)
    num_train_epochs: float = _help("Epochs to train for when max_steps is -1.", default=1.0)
    per_device_train_batch_size: int = _help("Sequences per process per micro-batch.", default=32)
    per_device_eval_batch_size: int = _help("Sequences per process per evaluation batch.", default=64)
    gradient_accumulation_steps: int = _help("Micro-batches summed into one optimizer step.", default=1)
    learning_rate: float = _help("Peak learning rate.", default=5e-4)
    weight_decay: float = _help("AdamW weight decay (never applied to biases and norms).", default=0.01)
    adam_beta1: float = _help("AdamW beta1.", default=0.9)
    adam_beta2: float = _help("AdamW beta2.", default=0.999)
    adam_epsilon: float = _help("AdamW epsilon.", default=1e-8)
    max_grad_norm: float = _help("Gradient clipping norm; 0 disables clipping.", default=1.0)
    optimizer: str = _help(
        "Optimizer: adamw (torch, fused), lamb (torch_optimizer.Lamb) or adamw_8bit (bitsandbytes). "
        "A DeepSpeed config with an optimizer section of the same algorithm runs DeepSpeed's implementation.",
        default="adamw",
    )
    lr_scheduler_type: str = _help("Schedule: linear, cosine, constant, constant_with_warmup.", default="linear")
    warmup_steps: int = _help("Linear warmup steps (wins over warmup_ratio when > 0).", default=0)
    warmup_ratio: float = _help("Warmup as a fraction of all steps.", default=0.0)
    mixed_precision: str = _help(
        "no, bf16 or fp16 (fp16 needs a GPU; it uses dynamic loss scaling, and steps the scaler skips do not "
        "advance the schedule).",
        default="no",
    )
    gradient_checkpointing: bool = _help(
        "Recompute activations in the backward pass: much less activation memory for about 1/3 more compute.",
        default=False,
    )
    max_consecutive_nonfinite_steps: int = _help(
        "Stop after this many optimizer steps in a row with a nan/inf loss (each is skipped, weights untouched).",
        default=5,
    )
    seed: int = _help("Seed for initialisation, shuffling and masking.", default=42)
    logging_steps: int = _help("Log training metrics every N optimizer steps.", default=10)
    eval_steps: int = _help("Evaluate every N steps; 0 evaluates only at the end.", default=0)
    eval_on_start: bool = _help("Evaluate once before training (the 'before' numbers).", default=True)
    max_eval_batches: int | None = _help("Cap on evaluation batches per process (None: all).", default=None)
    save_steps: int = _help("Checkpoint every N steps; 0 saves only the final checkpoint.", default=0)
    save_total_limit: int = _help(
        "Checkpoints kept under output_dir/checkpoints: the newest of this run's saves.", default=2
    )
    resume_from_checkpoint: str | None = _help(
        "'auto' (the newest valid checkpoint in output_dir; a fresh start there when there is none) or a "
        "checkpoint folder (newer checkpoints of the same output_dir are moved to checkpoints/abandoned-<time>).",
        default=None,
    )
    overwrite_output_dir: bool = _help(
        "Allow starting a fresh run in an output_dir that already holds one.", default=False
    )
    report_to: list = _help("Trackers: tensorboard, or [] for none.", default_factory=lambda: ["tensorboard"])
    torch_compile: bool = _help("Compile the model with torch.compile.", default=False)
    dataloader_num_workers: int = _help("DataLoader worker processes.", default=0)
    group_by_length: bool = _help(
        "Batch examples of similar length together (less padding) when the examples vary in length.", default=False
    )

    def validate(self) -> None:
        """Rules on the training section alone (shared by every command)."""
        from toolkit.engine.optim import OPTIMIZERS, SCHEDULERS

        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ToolkitError("set training.max_steps > 0 or training.num_train_epochs > 0")
        for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, key) < 1:
                raise ToolkitError(f"training.{key} must be at least 1 (got {getattr(self, key)})")
        if self.learning_rate <= 0:
            raise ToolkitError(f"training.learning_rate must be positive (got {self.learning_rate})")
        _choice("training.optimizer", self.optimizer, OPTIMIZERS)
        _choice("training.lr_scheduler_type", self.lr_scheduler_type, SCHEDULERS)
        _choice("training.mixed_precision", self.mixed_precision, ("no", "bf16", "fp16"))
        for key in ("logging_steps", "eval_steps", "save_steps", "warmup_steps", "dataloader_num_workers"):
            if getattr(self, key) < 0:
                raise ToolkitError(f"training.{key} must be >= 0 (got {getattr(self, key)})")
        if self.max_consecutive_nonfinite_steps < 1:
            raise ToolkitError(
                f"training.max_consecutive_nonfinite_steps must be at least 1 (got {self.max_consecutive_nonfinite_steps})"
            )
        if self.logging_steps == 0:
            raise ToolkitError("training.logging_steps must be at least 1")
        if self.save_total_limit < 1:
            raise ToolkitError(
                "training.save_total_limit must be at least 1 (the newest checkpoint is needed to resume)"
            )
        if not 0 <= self.warmup_ratio < 1:
            raise ToolkitError("training.warmup_ratio must be in [0, 1)")
        for tracker in self.report_to:
            _choice("training.report_to", tracker, ("tensorboard",))


# --------------------------------------------------------------------------------------------
# Pretraining
# --------------------------------------------------------------------------------------------


@dataclass
class TokenizerArgs:
    """The tokenizer: an existing one, or one trained on the training files."""

    path: str | None = _help(
        "Folder of an existing tokenizer; when unset one is trained on data.train_files.", default=None
    )
    kind: str | None = _help(
        "wordpiece (BERT/ELECTRA) or bpe (byte-level, GPT); unset picks the architecture's kind.",
        default=None,
    )
    vocab_size: int = _help("Vocabulary size of a trained tokenizer.", default=30522)
    lowercase: bool = _help("Lower-case text (WordPiece only).", default=True)
    min_frequency: int = _help("Minimum pair frequency for a merge.", default=2)


@dataclass
class DataArgs:
    """The corpus: raw text (or text fields of structured files), tokenized once and packed."""

    train_files: list = _help(
        "Files, folders or glob patterns (.txt, .jsonl, .json, .csv, .parquet, each optionally .gz); "
        "pkg://PACKAGE/path names a file inside an installed Python package.",
        default_factory=list,
    )
    validation_files: list = _help("Validation files; when empty a fraction is held out.", default_factory=list)
    validation_split_percentage: float = _help(
        "Percent of documents held out for validation when validation_files is empty.", default=5.0
    )
    max_seq_length: int = _help("Tokens per packed block (special tokens included).", default=128)
    text_field: str = _help("Column holding the text in .jsonl/.json/.csv/.parquet files.", default="text")
    document_boundary: str = _help(
        "How plain-text files split into documents: blank_line, line or file.", default="blank_line"
    )
    max_missing_text_share: float = _help(
        "Rows of .jsonl/.json/.csv/.parquet files without data.text_field are dropped and counted; a larger "
        "share than this stops the run (a wrong text_field, most likely).",
        default=0.1,
    )
    preprocessing_num_workers: int | None = _help(
        "Processes for tokenization (None: one per CPU core for large corpora).", default=None
    )
    cache_dir: str | None = _help(
        "Where tokenized corpora are cached (default: $TOOLKIT_CACHE or ~/.cache/toolkit).", default=None
    )


@dataclass
class ObjectiveArgs:
    """What the model learns: mlm (masked LM), clm (causal LM), mlm+nsp or nsp (BERT's next-sentence
    prediction, with or without masked LM), or rtd (ELECTRA's replaced-token detection)."""

    name: str = _help("Pretraining objective: mlm, clm, mlm+nsp, nsp or rtd.", default="mlm")
    mlm_probability: float = _help("Share of tokens selected for masking.", default=0.15)
    mask_replace_prob: float | None = _help(
        "Share of selected tokens replaced by [MASK]; unset: the objective's own (0.8 for BERT, 0.85 for rtd).",
        default=None,
    )
    random_replace_prob: float | None = _help(
        "Share of selected tokens replaced by a random token; unset: the objective's own (0.1 for BERT, 0 for rtd).",
        default=None,
    )
    whole_word_mask: bool = _help("Mask whole words rather than single word pieces.", default=False)
    # next-sentence prediction (nsp, mlm+nsp)
    short_seq_prob: float = _help(
        "NSP: share of sentence pairs filled to a random shorter length instead of data.max_seq_length (BERT: 0.1).",
        default=0.1,
    )
    pair_sampling: str = _help(
        "NSP: dynamic (sentence pairs drawn anew every epoch) or static (the same pairs every epoch).",
        default="dynamic",
    )
    # replaced-token detection (rtd, ELECTRA)
    generator_hidden_fraction: float = _help(
        "rtd: generator hidden size as a fraction of the discriminator's (ELECTRA: 1/4; heads = hidden / 64).",
        default=0.25,
    )
    discriminator_weight: float = _help(
        "rtd: weight of the discriminator loss against the generator's masked-LM loss (ELECTRA: 50).",
        default=50.0,
    )


@dataclass
class PretrainRecipe:
    """A pretraining run: `toolkit pretrain RECIPE [key=value ...]`."""

    output_dir: str = _help("Where the model, tokenizer, metrics and checkpoints go.", default="outputs/pretrain")
    model: ModelArgs = field(default_factory=ModelArgs)
    tokenizer: TokenizerArgs = field(default_factory=TokenizerArgs)
    data: DataArgs = field(default_factory=DataArgs)
    objective: ObjectiveArgs = field(default_factory=ObjectiveArgs)
    training: TrainingArgs = field(default_factory=TrainingArgs)

    def validate(self) -> None:
        """Cross-field rules, checked before any data is read."""
        from toolkit.models import ARCHITECTURES, SIZES
        from toolkit.objectives import OBJECTIVES

        m, o, d, t = self.model, self.objective, self.data, self.training
        _choice("model.architecture", m.architecture, ARCHITECTURES)
        _choice("objective.name", o.name, OBJECTIVES)
        if m.model_name_or_path is None:
            _choice("model.size", m.size, SIZES)
        OBJECTIVES[o.name].check_recipe(self)
        if not d.train_files:
            raise ToolkitError(
                "data.train_files is empty: give at least one text file, e.g. data.train_files=[corpus.txt]"
            )
        _choice("data.document_boundary", d.document_boundary, ("blank_line", "line", "file"))
        if not 0 <= d.max_missing_text_share <= 1:
            raise ToolkitError(f"data.max_missing_text_share={d.max_missing_text_share} must be in [0, 1]")
        if d.max_seq_length < 8:
            raise ToolkitError(f"data.max_seq_length={d.max_seq_length} is too short: use at least 8")
        if not d.validation_files and not 0 <= d.validation_split_percentage < 50:
            raise ToolkitError("data.validation_split_percentage must be in [0, 50)")
        if self.tokenizer.kind is not None:
            _choice("tokenizer.kind", self.tokenizer.kind, ("wordpiece", "bpe"))
        if self.tokenizer.vocab_size < 100:
            raise ToolkitError(f"tokenizer.vocab_size={self.tokenizer.vocab_size} is too small: use at least 100")
        if not 0 < o.mlm_probability < 1:
            raise ToolkitError(f"objective.mlm_probability={o.mlm_probability} must be between 0 and 1")
        mask_prob, random_prob = OBJECTIVES[o.name].replacement_probs(o)
        if mask_prob < 0 or random_prob < 0 or mask_prob + random_prob > 1:
            raise ToolkitError(
                "objective.mask_replace_prob and objective.random_replace_prob must be >= 0 and sum to at most 1"
            )
        t.validate()


def _choice(key: str, value: Any, allowed) -> None:
    if value not in allowed:
        near = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        raise ToolkitError(f"unknown {key} '{value}'{hint}: choose one of {', '.join(map(str, allowed))}")


# --------------------------------------------------------------------------------------------
# Loading: YAML + dotted overrides -> dataclasses, with type checks and nearest-key suggestions
# --------------------------------------------------------------------------------------------


def parse_overrides(items: list[str]) -> dict:
    """`["training.max_steps=20", "data.train_files=[a.txt]"]` -> nested dict (values parsed as YAML)."""
    tree: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ToolkitError(f"override '{item}' is not key=value (e.g. training.max_steps=20)")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as e:
            raise ToolkitError(f"cannot parse the value of override '{item}': {e.problem}") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ToolkitError(f"override '{key}' conflicts with another override of '{part}'")
    node[parts[-1]] = value


def merge(base: dict, extra: dict) -> dict:
    """Deep merge of nested dicts; `extra` wins. `config_overrides` style mappings merge too."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def normalize_overrides(overrides: dict) -> dict:
    """Python-API keyword overrides: `{"training.max_steps": 5}`, `training__max_steps=5` or nested."""
    tree: dict = {}
    for key, value in overrides.items():
        key = key.replace("__", ".")
        if isinstance(value, dict) and "." not in key and key != "config_overrides":
            tree = merge(tree, {key: value})
        else:
            _set_dotted(tree, key, value)
    return tree


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ToolkitError(f"recipe file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ToolkitError(f"recipe {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ToolkitError(f"recipe {path} must be a mapping of sections (output_dir, model, data, ...)")
    return data


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a nested dict, rejecting unknown keys with a suggestion."""
    if not isinstance(data, dict):
        raise ToolkitError(f"'{prefix.rstrip('.') or 'recipe'}' must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ToolkitError(_unknown_key_message(cls, prefix, key))
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = from_dict(typ, value or {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _check_type(f"{prefix}{key}", value, typ)
    return cls(**kwargs)


def _unknown_key_message(cls, prefix: str, key: str) -> str:
    local = [f.name for f in dataclasses.fields(cls)]
    near = difflib.get_close_matches(key, local, n=1, cutoff=0.5)
    if not near:  # perhaps the key sits in another section: search all dotted names
        everything = all_keys(_root_for(cls))
        near = difflib.get_close_matches(f"{prefix}{key}", everything, n=1, cutoff=0.5)
        suggestion = near[0] if near else None
    else:
        suggestion = f"{prefix}{near[0]}"
    hint = f"; did you mean '{suggestion}'?" if suggestion else ""
    return f"unknown recipe key '{prefix}{key}'{hint} (valid keys here: {', '.join(local)})"


_ROOTS: list = []


def _root_for(cls):
    for root in _ROOTS:
        if cls is root or cls in {typing.get_type_hints(root)[f.name] for f in dataclasses.fields(root)}:
            return root
    return cls


def all_keys(cls, prefix: str = "") -> list[str]:
    """Every dotted key of a recipe class: the public contract."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += all_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


def _check_type(key: str, value: Any, typ) -> Any:
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(typ)
        if value is None and type(None) in args:
            return None
        for arg in args:  # a value that already has one of the types keeps it (3 stays 3 in `list | int`)
            base = typing.get_origin(arg) or arg
            if arg is not type(None) and isinstance(value, base) and not isinstance(value, bool):
                return _check_type(key, value, arg)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(key, value, arg)
            except ToolkitError as e:
                errors.append(e)
        raise errors[0]
    base = origin or typ
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is float and isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if base is list and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return [value]  # a single file is a list of one
    if base is bool and not isinstance(value, bool):
        raise ToolkitError(f"'{key}' must be true or false, got {value!r}")
    if base is int and isinstance(value, bool):
        raise ToolkitError(f"'{key}' must be an integer, got {value!r}")
    if not isinstance(value, base):
        raise ToolkitError(f"'{key}' must be of type {base.__name__}, got {value!r}")
    return value


def load_recipe(cls, recipe: str | Path | dict | Any = None, overrides: dict | list | None = None):
    """defaults < recipe (a YAML path, a dict or an instance) < overrides; then validate()."""
    if isinstance(recipe, cls):
        data = to_dict(recipe)
    elif isinstance(recipe, dict):
        data = recipe
    elif recipe is None:
        data = {}
    else:
        data = read_yaml(recipe)
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    data = merge(data, overrides or {})
    obj = from_dict(cls, data)
    obj.validate()
    return obj


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def to_yaml(obj) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False)


def help_text(cls, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted key, help, default) for every field: used by `toolkit ... --help-recipe`."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            rows += help_text(hints[f.name], f"{prefix}{f.name}.")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            rows.append((f"{prefix}{f.name}", f.metadata.get("help", ""), default))
    return rows


_ROOTS.append(PretrainRecipe)
