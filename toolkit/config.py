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

from toolkit.errors import ToolkitError, check_choice


def help_field(text: str, **kw):
    return field(metadata={"help": text}, **kw)


# --------------------------------------------------------------------------------------------
# Sections shared by every command
# --------------------------------------------------------------------------------------------


@dataclass
class ModelArgs:
    """Which model to train: built from a size preset, or continued from a checkpoint folder."""

    architecture: str = help_field("Model family built from scratch: bert, gpt2 or electra.", default="bert")
    size: str = help_field(
        "Size preset: tiny, mini, small, medium, base, large (BERT family dimensions; for electra, small, base and "
        "large are ELECTRA-Small, -Base and -Large).",
        default="mini",
    )
    model_name_or_path: str | None = help_field(
        "A local Hugging Face checkpoint folder to continue from instead of a fresh model.", default=None
    )
    config_overrides: dict = help_field(
        "Mapping merged into the transformers config, e.g. {hidden_dropout_prob: 0.0}.",
        default_factory=dict,
    )


@dataclass
class TrainingArgs:
    """The shared training engine: batch, optimizer, schedule, precision, evaluation, checkpoints."""

    max_steps: int = help_field("Optimizer steps to train for; -1 means use num_train_epochs.", default=-1)
    num_train_epochs: float = help_field("Epochs to train for when max_steps is -1.", default=1.0)
    max_flops: float | None = help_field(
        "Training budget in model FLOPs (e.g. 1e15), instead of max_steps/num_train_epochs: the run stops at the "
        "first step at which train_flops >= max_flops. The schedule is sized to the budget: max_flops over the mean "
        "FLOPs of the first (up to 8) steps' batches.",
        default=None,
    )
    peak_flops: float | None = help_field(
        "Peak FLOP/s of one device for the mfu metric; unset: the bf16 dense peak of a known GPU (H100, H200, "
        "A100, L4, ...), or an fp32 matmul probe on CPU.",
        default=None,
    )
    per_device_train_batch_size: int = help_field("Sequences per process per micro-batch.", default=32)
    per_device_eval_batch_size: int = help_field("Sequences per process per evaluation batch.", default=64)
    gradient_accumulation_steps: int = help_field("Micro-batches summed into one optimizer step.", default=1)
    learning_rate: float = help_field("Peak learning rate.", default=5e-4)
    weight_decay: float = help_field("AdamW weight decay (never applied to biases and norms).", default=0.01)
    adam_beta1: float = help_field("AdamW beta1.", default=0.9)
    adam_beta2: float = help_field("AdamW beta2.", default=0.999)
    adam_epsilon: float = help_field("AdamW epsilon.", default=1e-8)
    max_grad_norm: float = help_field("Gradient clipping norm; 0 disables clipping.", default=1.0)
    optimizer: str = help_field(
        "Optimizer: adamw (torch, fused), lamb (pytorch_optimizer.Lamb) or adamw_8bit (bitsandbytes). "
        "A DeepSpeed config with an optimizer section of the same algorithm runs DeepSpeed's implementation.",
        default="adamw",
    )
    lr_scheduler_type: str = help_field("Schedule: linear, cosine, constant, constant_with_warmup.", default="linear")
    warmup_steps: int = help_field("Linear warmup steps (wins over warmup_ratio when > 0).", default=0)
    warmup_ratio: float = help_field("Warmup as a fraction of all steps.", default=0.0)
    mixed_precision: str = help_field(
        "no, bf16 or fp16 (fp16 needs a GPU; it uses dynamic loss scaling, and steps the scaler skips do not "
        "advance the schedule).",
        default="no",
    )
    gradient_checkpointing: bool = help_field(
        "Recompute activations in the backward pass: much less activation memory for about 1/3 more compute.",
        default=False,
    )
    max_consecutive_nonfinite_steps: int = help_field(
        "Stop after this many optimizer steps in a row with a nan/inf loss (each is skipped, weights untouched).",
        default=5,
    )
    seed: int = help_field("Seed for initialisation, shuffling and masking.", default=42)
    logging_steps: int = help_field("Log training metrics every N optimizer steps.", default=10)
    eval_steps: int = help_field("Evaluate every N steps; 0 evaluates only at the end.", default=0)
    eval_on_start: bool = help_field("Evaluate once before training (the 'before' numbers).", default=True)
    max_eval_batches: int | None = help_field(
        "Evaluate only the first max_eval_batches x per_device_eval_batch_size examples of the validation set, "
        "shared out over the processes: the same examples, and figures, with any number of processes (None: all).",
        default=None,
    )
    save_steps: int = help_field("Checkpoint every N steps; 0 saves only the final checkpoint.", default=0)
    save_total_limit: int = help_field(
        "Checkpoints kept under output_dir/checkpoints: the newest of this run's saves.", default=2
    )
    resume_from_checkpoint: str | None = help_field(
        "'auto' (the newest valid checkpoint in output_dir; a fresh start there when there is none) or a "
        "checkpoint folder (newer checkpoints of the same output_dir are moved to checkpoints/abandoned-<time>).",
        default=None,
    )
    overwrite_output_dir: bool = help_field(
        "Allow starting a fresh run in an output_dir that already holds one.", default=False
    )
    report_to: list = help_field(
        "Trackers (accelerate's): tensorboard, mlflow, wandb, comet_ml, aim, clearml, dvclive, swanlab, trackio; "
        "[] for none. Each needs its package installed.",
        default_factory=lambda: ["tensorboard"],
    )
    torch_compile: bool = help_field("Compile the model with torch.compile.", default=False)
    dataloader_num_workers: int = help_field("DataLoader worker processes.", default=0)
    group_by_length: bool = help_field(
        "Batch examples of similar length together (less padding) when the examples vary in length.", default=False
    )
    tensor_parallel_size: int = help_field(
        "Processes that split each layer's matrices (Megatron-style tensor parallelism on PyTorch DTensor): "
        "attention heads and FFN units are divided among them. The launched processes must be a multiple of it; "
        "the rest is data parallelism. 1 turns it off.",
        default=1,
    )
    pipeline_parallel_size: int = help_field(
        "Pipeline stages: processes that each hold a consecutive share of the layers (embeddings on the first, "
        "the head on the last; torch.distributed.pipelining), pretraining with mlm (bert) or clm (gpt2). The "
        "launched processes must be a multiple of it; the rest is data parallelism. 1 turns it off.",
        default=1,
    )
    pipeline_micro_batches: int | None = help_field(
        "Pipeline parallelism: pieces each micro-batch (per_device_train_batch_size) is cut into to keep the stages "
        "busy; it must divide the micro-batch. Unset: the largest divisor up to 4 x pipeline_parallel_size.",
        default=None,
    )
    pipeline_schedule: str = help_field(
        "Pipeline parallelism: 1f1b (one forward, one backward: activations of at most as many pieces as stages "
        "are held; needs pieces >= stages) or gpipe (all forwards, then all backwards).",
        default="1f1b",
    )

    def validate(self) -> None:
        """Rules on the training section alone (shared by every command)."""
        from toolkit.engine.optim import OPTIMIZERS, SCHEDULERS

        if self.max_flops is not None:
            if self.max_flops <= 0:
                raise ToolkitError(f"training.max_flops must be positive (got {self.max_flops}), e.g. 1e15")
            if self.max_steps > 0:
                raise ToolkitError(
                    "training.max_flops and training.max_steps both set the length of the run: keep one "
                    "(max_steps=-1 with max_flops)"
                )
        elif self.max_steps <= 0 and self.num_train_epochs <= 0:
            if not (getattr(self, "zero_steps_evaluate", False) and self.num_train_epochs == 0):
                raise ToolkitError("set training.max_steps > 0 or training.num_train_epochs > 0")
        if self.peak_flops is not None and self.peak_flops <= 0:
            raise ToolkitError(f"training.peak_flops must be positive FLOP/s (got {self.peak_flops}), e.g. 989e12")
        for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
            if getattr(self, key) < 1:
                raise ToolkitError(f"training.{key} must be at least 1 (got {getattr(self, key)})")
        if self.learning_rate is None or self.learning_rate <= 0:
            raise ToolkitError(f"training.learning_rate must be a positive number (got {self.learning_rate})")
        check_choice("training.optimizer", self.optimizer, OPTIMIZERS)
        check_choice("training.lr_scheduler_type", self.lr_scheduler_type, SCHEDULERS)
        check_choice("training.mixed_precision", self.mixed_precision, ("no", "bf16", "fp16"))
        for key in ("logging_steps", "eval_steps", "save_steps", "warmup_steps", "dataloader_num_workers"):
            if getattr(self, key) < 0:
                raise ToolkitError(f"training.{key} must be >= 0 (got {getattr(self, key)})")
        if self.max_consecutive_nonfinite_steps < 1:
            raise ToolkitError(
                f"training.max_consecutive_nonfinite_steps must be at least 1 (got {self.max_consecutive_nonfinite_steps})"
            )
        if self.tensor_parallel_size < 1:
            raise ToolkitError(f"training.tensor_parallel_size must be at least 1 (got {self.tensor_parallel_size})")
        from toolkit.engine.pipeline import check_training

        check_training(self)
        if self.logging_steps == 0:
            raise ToolkitError("training.logging_steps must be at least 1")
        if self.max_eval_batches is not None and self.max_eval_batches < 1:
            raise ToolkitError(
                f"training.max_eval_batches must be at least 1, or null for the whole validation set "
                f"(got {self.max_eval_batches})"
            )
        if self.save_total_limit < 1:
            raise ToolkitError(
                "training.save_total_limit must be at least 1 (the newest checkpoint is needed to resume)"
            )
        if not 0 <= self.warmup_ratio < 1:
            raise ToolkitError("training.warmup_ratio must be in [0, 1)")
        from toolkit.engine.tracking import check_trackers

        check_trackers(self.report_to)


# --------------------------------------------------------------------------------------------
# Pretraining
# --------------------------------------------------------------------------------------------


@dataclass
class TokenizerArgs:
    """The tokenizer: an existing one, or one trained on the training files."""

    path: str | None = help_field(
        "Folder of an existing tokenizer; when unset one is trained on data.train_files.", default=None
    )
    kind: str | None = help_field(
        "wordpiece (BERT/ELECTRA) or bpe (byte-level, GPT); unset picks the architecture's kind.",
        default=None,
    )
    vocab_size: int = help_field("Vocabulary size of a trained tokenizer.", default=30522)
    lowercase: bool = help_field("Lower-case text (WordPiece only).", default=True)
    min_frequency: int = help_field("Minimum pair frequency for a merge.", default=2)
    extend_vocab: int = help_field(
        "Continued pretraining: add up to this many words frequent in data.train_files that the checkpoint's "
        "WordPiece tokenizer splits into pieces; each new embedding row starts at the mean of its pieces' rows.",
        default=0,
    )


@dataclass
class DataArgs:
    """The corpus: raw text (or text fields of structured files), tokenized once and packed."""

    train_files: list = help_field(
        "Files, folders or glob patterns (.txt, .jsonl, .json, .csv, .parquet, each optionally .gz); "
        "pkg://PACKAGE/path names a file inside an installed Python package.",
        default_factory=list,
    )
    validation_files: list = help_field("Validation files; when empty a fraction is held out.", default_factory=list)
    validation_split_percentage: float = help_field(
        "Percent of documents held out for validation when validation_files is empty.", default=5.0
    )
    max_seq_length: int = help_field("Tokens per packed block (special tokens included).", default=128)
    segments: int = help_field(
        "Encoder blocks (mlm, rtd): 2 splits each block at a sentence boundary into [CLS] A [SEP] B [SEP] with "
        "token types 0 and 1, as ELECTRA's data builder does; 1 packs [CLS] and one run of text.",
        default=2,
    )
    text_field: str = help_field("Column holding the text in .jsonl/.json/.csv/.parquet files.", default="text")
    document_boundary: str = help_field(
        "How plain-text files split into documents: blank_line, line or file.", default="blank_line"
    )
    max_missing_text_share: float = help_field(
        "Rows of .jsonl/.json/.csv/.parquet files without data.text_field are dropped and counted; a larger "
        "share than this stops the run (a wrong text_field, most likely).",
        default=0.1,
    )
    preprocessing_num_workers: int | None = help_field(
        "Processes for tokenization (None: one per CPU core for large corpora).", default=None
    )
    cache_dir: str | None = help_field(
        "Where tokenized corpora are cached (default: $TOOLKIT_CACHE or ~/.cache/toolkit).", default=None
    )
    streaming: bool = help_field(
        "Read, tokenize and pack the training files on the fly (plain text or .jsonl, optionally .gz), each "
        "process its own share of the documents, with no cache of the corpus and an exact resume; needs "
        "training.max_steps, data.segments=1 for mlm/rtd, and data.validation_files (or "
        "validation_split_percentage=0).",
        default=False,
    )
    shuffle_buffer: int = help_field(
        "Streaming: blocks held in the shuffle buffer (memory: this x max_seq_length x 4 bytes per process).",
        default=1000,
    )


@dataclass
class ObjectiveArgs:
    """What the model learns: mlm (masked LM), clm (causal LM), mlm+nsp or nsp (BERT's next-sentence
    prediction, with or without masked LM), or rtd (ELECTRA's replaced-token detection)."""

    name: str = help_field("Pretraining objective: mlm, clm, mlm+nsp, nsp or rtd.", default="mlm")
    mlm_probability: float | None = help_field(
        "Share of tokens selected for masking; unset: 0.15 (ELECTRA-Large with rtd: 0.25).", default=None
    )
    mask_replace_prob: float | None = help_field(
        "Share of selected tokens replaced by [MASK]; unset: the objective's own (0.8 for BERT, 0.85 for rtd).",
        default=None,
    )
    random_replace_prob: float | None = help_field(
        "Share of selected tokens replaced by a random token; unset: the objective's own (0.1 for BERT, 0 for rtd).",
        default=None,
    )
    whole_word_mask: bool = help_field(
        "Select whole words rather than single word pieces (all pieces of a selected word are predicted; "
        "each piece still gets the [MASK] / random / kept split, as BERT's whole-word masking).",
        default=False,
    )
    masking: str = help_field(
        "How many tokens are selected: bernoulli (each token, or word, with probability mlm_probability, "
        "so the count varies) or fixed_count (exactly round(mlm_probability x sequence length, padding "
        "excluded) tokens, at least 1, as BERT's and ELECTRA's data code; whole words are taken while "
        "their pieces fit that count).",
        default="bernoulli",
    )
    max_predictions_per_seq: int | None = help_field(
        "At most this many selected tokens per sequence (BERT: 20 at length 128, 80 at 512); with "
        "bernoulli a random subset of the selection (of whole words, never overflowing) is kept; unset: no cap.",
        default=None,
    )
    # next-sentence prediction (nsp, mlm+nsp)
    short_seq_prob: float = help_field(
        "NSP: share of sentence pairs filled to a random shorter length instead of data.max_seq_length (BERT: 0.1).",
        default=0.1,
    )
    pair_sampling: str = help_field(
        "NSP: dynamic (sentence pairs drawn anew every epoch) or static (the same pairs every epoch).",
        default="dynamic",
    )
    # replaced-token detection (rtd, ELECTRA)
    generator_hidden_fraction: float | None = help_field(
        "rtd: generator hidden size as a fraction of the discriminator's (heads = hidden / 64, same depth); "
        "unset: ELECTRA's for the size (1/3 for base, 1/4 otherwise).",
        default=None,
    )
    discriminator_weight: float = help_field(
        "rtd: weight of the discriminator loss against the generator's masked-LM loss (ELECTRA: 50).",
        default=50.0,
    )


@dataclass
class PretrainRecipe:
    """A pretraining run: `toolkit pretrain RECIPE [key=value ...]`."""

    output_dir: str = help_field("Where the model, tokenizer, metrics and checkpoints go.", default="outputs/pretrain")
    model: ModelArgs = field(default_factory=ModelArgs)
    tokenizer: TokenizerArgs = field(default_factory=TokenizerArgs)
    data: DataArgs = field(default_factory=DataArgs)
    objective: ObjectiveArgs = field(default_factory=ObjectiveArgs)
    training: TrainingArgs = field(default_factory=TrainingArgs)

    def validate(self) -> None:
        """Cross-field rules, checked before any data is read."""
        from toolkit.data.collators import MASKING
        from toolkit.models import ARCHITECTURES, SIZES
        from toolkit.objectives import OBJECTIVES

        m, o, d, t = self.model, self.objective, self.data, self.training
        check_choice("model.architecture", m.architecture, ARCHITECTURES)
        check_choice("objective.name", o.name, OBJECTIVES)
        if m.model_name_or_path is None:
            check_choice("model.size", m.size, SIZES)
        OBJECTIVES[o.name].check_recipe(self)
        if not d.train_files:
            raise ToolkitError(
                "data.train_files is empty: give at least one text file, e.g. data.train_files=[corpus.txt]"
            )
        check_choice("data.document_boundary", d.document_boundary, ("blank_line", "line", "file"))
        check_choice("data.segments", d.segments, (1, 2))
        if not 0 <= d.max_missing_text_share <= 1:
            raise ToolkitError(f"data.max_missing_text_share={d.max_missing_text_share} must be in [0, 1]")
        if d.max_seq_length < 8:
            raise ToolkitError(f"data.max_seq_length={d.max_seq_length} is too short: use at least 8")
        if not d.validation_files and not 0 <= d.validation_split_percentage < 50:
            raise ToolkitError("data.validation_split_percentage must be in [0, 50)")
        if d.streaming:
            check_streaming(self)
        if t.pipeline_parallel_size > 1:
            check_pipeline(self)
        if self.tokenizer.kind is not None:
            check_choice("tokenizer.kind", self.tokenizer.kind, ("wordpiece", "bpe"))
        if self.tokenizer.extend_vocab < 0:
            raise ToolkitError(f"tokenizer.extend_vocab={self.tokenizer.extend_vocab} must be 0 (off) or a word count")
        if self.tokenizer.extend_vocab and not m.model_name_or_path:
            raise ToolkitError(
                "tokenizer.extend_vocab extends a pretrained checkpoint's vocabulary: set model.model_name_or_path, "
                "or use tokenizer.vocab_size for a tokenizer trained from scratch"
            )
        if self.tokenizer.vocab_size < 100:
            raise ToolkitError(f"tokenizer.vocab_size={self.tokenizer.vocab_size} is too small: use at least 100")
        if o.mlm_probability is not None and not 0 < o.mlm_probability < 1:
            raise ToolkitError(f"objective.mlm_probability={o.mlm_probability} must be between 0 and 1")
        check_choice("objective.masking", o.masking, MASKING)
        if o.max_predictions_per_seq is not None and o.max_predictions_per_seq < 1:
            raise ToolkitError(
                f"objective.max_predictions_per_seq={o.max_predictions_per_seq} must be at least 1 "
                "(BERT: 20 for sequences of 128), or unset for no cap"
            )
        mask_prob, random_prob = OBJECTIVES[o.name].replacement_probs(o)
        if mask_prob < 0 or random_prob < 0 or mask_prob + random_prob > 1:
            raise ToolkitError(
                "objective.mask_replace_prob and objective.random_replace_prob must be >= 0 and sum to at most 1"
            )
        t.validate()


def check_streaming(recipe) -> None:
    """What a streamed corpus (data.streaming) cannot be combined with, each one clear error."""
    from toolkit.objectives import OBJECTIVES
    from toolkit.objectives.base import Objective

    d, t, objective = recipe.data, recipe.training, OBJECTIVES[recipe.objective.name]
    if not d.validation_files and d.validation_split_percentage > 0:
        raise ToolkitError(
            f"data.streaming cannot hold out data.validation_split_percentage={d.validation_split_percentage}% of a "
            "corpus it never holds whole: give data.validation_files, or set data.validation_split_percentage=0"
        )
    if objective.prepare_data.__func__ is not Objective.prepare_data.__func__:
        raise ToolkitError(
            f"data.streaming packs blocks for mlm, clm and rtd, not '{objective.name}': set data.streaming=false"
        )
    if objective.two_segments and d.segments == 2:
        raise ToolkitError("data.streaming packs one run of text per block: set data.segments=1")
    if objective.needs_word_starts(recipe.objective):
        raise ToolkitError("data.streaming does not carry word starts: set objective.whole_word_mask=false")
    if t.max_steps <= 0:
        raise ToolkitError("data.streaming has no known epoch length: set training.max_steps")
    if d.shuffle_buffer < 1:
        raise ToolkitError(f"data.shuffle_buffer={d.shuffle_buffer} must be at least 1 (1: no shuffling)")
    if t.dataloader_num_workers:
        raise ToolkitError("data.streaming reads in the training process: set training.dataloader_num_workers=0")
    if recipe.tokenizer.path is None and recipe.model.model_name_or_path is None:
        raise ToolkitError(
            "data.streaming needs a ready tokenizer (training one would read the whole corpus): set tokenizer.path"
        )


def check_pipeline(recipe) -> None:
    """What pipeline parallelism cannot split: an objective without stages, more stages than layers."""
    from toolkit.engine.pipeline import check_stages
    from toolkit.models import preset
    from toolkit.objectives import OBJECTIVES
    from toolkit.objectives.base import Objective

    pp, objective = recipe.training.pipeline_parallel_size, OBJECTIVES[recipe.objective.name]
    if objective.pipeline_split is Objective.pipeline_split:
        splits = sorted(name for name, cls in OBJECTIVES.items() if cls.pipeline_split is not Objective.pipeline_split)
        raise ToolkitError(
            f"training.pipeline_parallel_size={pp}: objective '{objective.name}' cannot be split into pipeline stages "
            f"(those that can: {', '.join(splits)}): set training.pipeline_parallel_size=1"
        )
    m = recipe.model
    if m.model_name_or_path is None:  # a checkpoint's depth is checked when it is loaded
        overrides = m.config_overrides or {}
        layers = overrides.get("num_hidden_layers", overrides.get("n_layer", preset(m.architecture, m.size)[0]))
        check_stages(layers, pp)


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


RECIPE_CLASSES: list = []


def _root_for(cls):
    for root in RECIPE_CLASSES:
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


def _yaml_bool_as_text(value: bool) -> str:
    """YAML 1.1 reads unquoted no/off/false as False and yes/on/true as True. Given to a text
    field, a boolean is such a misreading (accelerate spells `mixed_precision=no`): hand back the
    spelling most likely typed, and let the field's own rule (`_choice` in validate) judge it."""
    return "yes" if value else "no"


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
    if base is str and isinstance(value, bool):
        return _yaml_bool_as_text(value)
    if not isinstance(value, base):
        raise ToolkitError(f"'{key}' must be of type {base.__name__}, got {value!r}")
    return value


def resolve(cls, recipe: str | Path | dict | Any = None, overrides: list | dict | None = None, **kwargs):
    """The one way to a recipe: defaults < recipe (a YAML path, a dict or an instance) < overrides
    (dotted strings, a nested dict, or keywords with `__` for the dot); then the defaults that depend on
    other fields are filled (`derived_defaults`, a new recipe) and the result is validated.

    An instance passes only the values it was given: what a previous resolve derived (the per-mode
    learning rate, say) is derived again, so a resolved recipe can be re-resolved with another mode.
    """
    data = recipe_data(recipe)
    extra = combine_overrides(overrides, kwargs)
    if hasattr(cls, "yield_to_overrides"):  # keys of the file that the overrides replace as a whole
        data = cls.yield_to_overrides(data, extra)
    return finish(cls, from_dict(cls, merge(data, extra)))


def finish(cls, obj):
    """Fill the derived defaults of a freshly built recipe (remembering which), then validate it."""
    derive = getattr(obj, "derived_defaults", None)
    filled = derive() if derive else {}
    if filled:
        obj = from_dict(cls, merge(to_dict(obj), _tree(filled)))
    object.__setattr__(obj, "_derived", frozenset(filled))
    obj.validate()
    return obj


def recipe_data(recipe) -> dict:
    """The values a recipe source gives: a YAML file, a dict, or an instance (derived values dropped)."""
    if recipe is None:
        return {}
    if isinstance(recipe, dict):
        return recipe
    if dataclasses.is_dataclass(recipe):
        data = to_dict(recipe)
        for key in getattr(recipe, "_derived", ()):
            _drop_dotted(data, key)
        return data
    return read_yaml(recipe)


def combine_overrides(overrides: list | dict | None, kwargs: dict | None = None) -> dict:
    """Overrides as one nested dict: dotted strings or a dict, then Python keywords (which win)."""
    if isinstance(overrides, list):
        tree = parse_overrides(overrides)
    elif overrides:
        tree = normalize_overrides(overrides)
    else:
        tree = {}
    return merge(tree, normalize_overrides(kwargs or {}))


def _tree(dotted: dict) -> dict:
    tree: dict = {}
    for key, value in dotted.items():
        _set_dotted(tree, key, value)
    return tree


def _drop_dotted(tree: dict, key: str) -> None:
    *parents, last = key.split(".")
    for part in parents:
        tree = tree.get(part) or {}
    tree.pop(last, None)


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def to_yaml(obj) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False)


def help_text(cls, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted key, help, default) for every field, from the dataclasses' own help."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            rows += help_text(hints[f.name], f"{prefix}{f.name}.")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            rows.append((f"{prefix}{f.name}", f.metadata.get("help", ""), default))
    return rows


def recipe_help(cls) -> str:
    """The recipe reference a command prints for `--help-recipe`: every key, its default and its help,
    grouped by section under the section's own description."""
    import textwrap

    hints = typing.get_type_hints(cls)
    lines = [f"{cls.__name__}: {(cls.__doc__ or '').strip()}", "Override any key as key=value (values are YAML)."]
    section = None
    for key, text, default in help_text(cls):
        head = key.split(".")[0] if "." in key else ""
        if head != section:
            section = head
            doc = (hints[head].__doc__ or "").strip() if head else ""
            lines += ["", f"{head}:" + (f" {' '.join(doc.split())}" if doc else "") if head else "top level:"]
        lines.append(
            f"  {key} = {yaml.safe_dump(default, default_flow_style=True).strip().removesuffix('...').strip()}"
        )
        lines += textwrap.wrap(text, width=100, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


RECIPE_CLASSES.append(PretrainRecipe)
