"""Compression recipes: `toolkit compress RECIPE [key=value ...]`.

Sections: output_dir, model (the model to compress; for distillation the student's starting point),
task (the labelled data the report measures on, as in fine-tuning), data (raw text, for masked-LM
distillation only), compress (the method and its options), training (the shared engine's keys, for
recovery fine-tuning after pruning and for distillation) and report (how latency is measured).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from toolkit.config import RECIPE_CLASSES, DataArgs, help_field
from toolkit.errors import ToolkitError, check_choice
from toolkit.finetuning.config import CheckpointArgs, FinetuneTrainingArgs, TaskArgs

METHODS = ("quantize", "prune", "distill")
SCHEMES = ("int8_dynamic", "bnb_8bit", "bnb_4bit")
OBJECTIVES = ("classification", "mlm")


@dataclass
class CompressArgs:
    """What compression to apply, and its options (each read only by its method)."""

    method: str = help_field(
        "quantize (post-training quantization), prune (magnitude or structured pruning) or distill "
        "(knowledge distillation into a smaller student).",
        default="quantize",
    )
    schemes: list = help_field(
        "quantize: int8_dynamic (torchao: int8 weights, activations quantized per token at run time; CPU), "
        "bnb_8bit and bnb_4bit (bitsandbytes LLM.int8() and NF4 weights). Each becomes a row of the report.",
        default_factory=lambda: ["int8_dynamic"],
    )
    sparsity: float = help_field(
        "prune: share of weights set to zero (unstructured: of every Linear weight in the encoder, ranked "
        "globally by magnitude; structured: of the attention heads and feed-forward neurons of every layer).",
        default=0.5,
    )
    structured: bool = help_field(
        "prune: remove whole attention heads and feed-forward neurons (smaller matrices, faster) instead of "
        "zeroing single weights (same shapes, sparse).",
        default=False,
    )
    importance_batches: int = help_field(
        "prune, structured: training batches used to rank heads and neurons by first-order (Taylor) "
        "importance; 0 ranks them by weight magnitude.",
        default=16,
    )
    recovery_epochs: float = help_field(
        "prune: epochs of fine-tuning after pruning (pruned weights stay zero); 0 for none.", default=0.0
    )
    objective: str = help_field(
        "distill: classification (the teacher is a fine-tuned classifier, data from task) or mlm (the teacher "
        "is a masked LM, data is raw text from the data section).",
        default="classification",
    )
    teacher: str | None = help_field("distill: the teacher's folder (pkg://PACKAGE/path works too).", default=None)
    student_layers: list | int | None = help_field(
        "distill: the student keeps these encoder layers of its starting checkpoint (model.model_name_or_path, "
        "or the teacher when that is unset): a count (evenly spaced, first and last included) or a list of "
        "indices; unset keeps every layer.",
        default=None,
    )
    student_config: dict = help_field(
        "distill: overrides of the student's config, e.g. {hidden_size: 256, num_attention_heads: 4, "
        "intermediate_size: 1024}; overrides that change weight shapes start the student from random weights.",
        default_factory=dict,
    )
    temperature: float = help_field("distill: softmax temperature T of the soft targets.", default=2.0)
    alpha: float = help_field(
        "distill: weight of the distillation term; loss = alpha * T^2 * KL(teacher/T || student/T) + "
        "(1 - alpha) * CE(labels).",
        default=0.5,
    )
    baseline: bool = help_field(
        "distill: also train the same student without a teacher (alpha 0) on the same data and budget, as a "
        "row of the report.",
        default=True,
    )


@dataclass
class ReportArgs:
    """How the before/after report measures each model."""

    latency_batch_size: int = help_field("CPU latency (and test metrics): examples per batch.", default=32)
    latency_seq_length: int | None = help_field(
        "CPU latency: tokens per example (every example padded to it); unset: task.max_seq_length.", default=None
    )
    latency_repeats: int = help_field(
        "CPU latency: timed runs (the median is reported), after 3 warm-up runs.", default=20
    )
    compile: bool = help_field(
        "Run every model compiled (torch.compile, inductor, weights frozen) for latency and test metrics, as CPU "
        "inference is deployed; torchao's int8 kernels are fast only this way on CPUs without AVX512-VNNI. false: "
        "eager PyTorch (no compile time; int8 then runs far slower than fp32 on such CPUs).",
        default=True,
    )


@dataclass
class CompressTrainingArgs(FinetuneTrainingArgs):
    """The shared training engine, for recovery fine-tuning and distillation (fine-tuning defaults)."""

    learning_rate: float | None = help_field(
        "Peak learning rate; unset: 5e-5 for recovery fine-tuning and for distillation.", default=None
    )


@dataclass
class CompressRecipe:
    """A compression run: `toolkit compress RECIPE [key=value ...]`."""

    output_dir: str = help_field(
        "Where the compressed model(s), the report (report.md, report.csv, report.png) and results.json go.",
        default="outputs/compress",
    )
    model: CheckpointArgs = field(default_factory=CheckpointArgs)
    task: TaskArgs = field(default_factory=TaskArgs)
    data: DataArgs = field(default_factory=DataArgs)
    compress: CompressArgs = field(default_factory=CompressArgs)
    training: CompressTrainingArgs = field(default_factory=CompressTrainingArgs)
    report: ReportArgs = field(default_factory=ReportArgs)

    def derived_defaults(self) -> dict:
        """Recovery fine-tuning and distillation start from a trained model: a small learning rate."""
        return {"training.learning_rate": 5e-5} if self.training.learning_rate is None else {}

    def validate(self) -> None:
        """Cross-field rules, checked before any model or data is read."""
        c, t, r = self.compress, self.training, self.report
        check_choice("compress.method", c.method, METHODS)
        check_choice("compress.objective", c.objective, OBJECTIVES)
        mlm = c.method == "distill" and c.objective == "mlm"
        if not self.model.model_name_or_path and not (c.method == "distill" and c.teacher):
            raise ToolkitError(
                "model.model_name_or_path is not set: give the folder of the model to compress (e.g. the output_dir "
                "of toolkit finetune)"
            )
        if c.method == "quantize":
            if not c.schemes:
                raise ToolkitError(f"compress.schemes is empty: list at least one of {', '.join(SCHEMES)}")
            for s in c.schemes:
                check_choice("compress.schemes", s, SCHEMES)
            if len(set(c.schemes)) != len(c.schemes):
                raise ToolkitError(f"compress.schemes lists a scheme twice: {c.schemes}")
        if c.method == "prune":
            if not 0 < c.sparsity < 1:
                raise ToolkitError(
                    f"compress.sparsity={c.sparsity} must be between 0 and 1 (exclusive), e.g. 0.5 for half"
                )
            if c.importance_batches < 0 or c.recovery_epochs < 0:
                raise ToolkitError("compress.importance_batches and compress.recovery_epochs must be >= 0")
            if c.recovery_epochs and not (self.task.name or self.task.train_file):
                raise ToolkitError(
                    "compress.recovery_epochs fine-tunes on the task's labels: set task.name or task.train_file (the "
                    "data the model was fine-tuned on), or compress.recovery_epochs=0"
                )
        if c.method == "distill":
            if not c.teacher:
                raise ToolkitError("compress.method=distill needs compress.teacher: the folder of the teacher model")
            if c.temperature <= 0:
                raise ToolkitError(f"compress.temperature={c.temperature} must be positive (e.g. 2.0)")
            if not 0 <= c.alpha <= 1:
                raise ToolkitError(f"compress.alpha={c.alpha} must be in [0, 1]")
            layers = c.student_layers
            if isinstance(layers, bool) or not (
                layers is None
                or (isinstance(layers, int) and layers >= 1)
                or (isinstance(layers, list) and layers and all(isinstance(i, int) and i >= 0 for i in layers))
            ):
                raise ToolkitError(
                    f"compress.student_layers={layers!r}: give a number of layers (e.g. 3) or a list of layer "
                    "indices (e.g. [0, 2, 4])"
                )
            if isinstance(layers, list) and len(set(layers)) != len(layers):
                raise ToolkitError(f"compress.student_layers lists a layer twice: {layers}")
        if mlm:
            if not self.data.train_files:
                raise ToolkitError(
                    "compress.objective=mlm distils on raw text: set data.train_files (text files, folders or globs)"
                )
        elif c.method == "distill" or self.task.name or self.task.train_file:
            self._validate_task()  # the task rules of fine-tuning: a built-in task or files, splits, lengths
        if r.latency_batch_size < 1 or r.latency_repeats < 1:
            raise ToolkitError("report.latency_batch_size and report.latency_repeats must be at least 1")
        t.validate()

    def _validate_task(self) -> None:
        from toolkit.config import finish
        from toolkit.finetuning.config import FinetuneRecipe

        finish(FinetuneRecipe, FinetuneRecipe(model=CheckpointArgs(model_name_or_path="-"), task=self.task))


RECIPE_CLASSES.append(CompressRecipe)
