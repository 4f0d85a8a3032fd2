"""What the report measures of each model: parameters, non-zero parameters, size on disk, CPU latency,
quality on the task (test accuracy / F1, or masked-LM loss on held-out text) and agreement with the
original model's outputs.

Every model is measured the same way, on the CPU, in inference mode: latency is the median over
`report.latency_repeats` timed runs of one batch of `latency_batch_size` test examples padded to
`latency_seq_length` tokens, after three warm-up runs.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass
class Row:
    """One line of the report."""

    name: str
    folder: str | None  # where the model is saved (None: the input model, unchanged)
    params: int
    nonzero_params: int
    size_bytes: int
    latency_ms: float
    metrics: dict = field(default_factory=dict)  # accuracy, macro_f1, agreement / mlm_loss, mlm_accuracy
    note: str = ""


def count_parameters(model) -> tuple[int, int]:
    """(values, non-zero values) over the model's parameters, however they are stored: quantized
    tensors count their integer codes, and a bitsandbytes 4-bit parameter packs two codes per byte."""
    total = nonzero = 0
    for p in model.parameters():
        values, per_element = _stored_values(p)
        total += values.numel() * per_element
        nonzero += int(torch.count_nonzero(values)) * per_element
    return total, nonzero


def _stored_values(p) -> tuple[torch.Tensor, int]:
    inner = getattr(p, "qdata", None)  # torchao's quantized tensors: the int8 codes
    if isinstance(inner, torch.Tensor):
        return inner, 1
    if type(p).__name__ == "Params4bit":
        return p.data, 2
    return p.data, 1


def weights_size(folder: Path) -> int:
    """Bytes of the weight files in a model folder (configs and tokenizer are not counted)."""
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))


def latency_batch(data, tokenizer, batch_size: int, seq_length: int) -> dict:
    """The timed batch: the first `batch_size` test (else validation, else training) examples,
    every one padded (or cut) to `seq_length` tokens. Without a task: random token ids."""
    split = next((s for s in (data.test, data.validation, data.train) if s is not None), None) if data else None
    if split is None:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(len(tokenizer) // 2, len(tokenizer), (batch_size, seq_length), generator=g)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    fills = {"input_ids": tokenizer.pad_token_id, "attention_mask": 0, "token_type_ids": 0}
    columns = [c for c in fills if c in split.column_names]
    rows = split.select_columns(columns)[: min(batch_size, len(split))]
    batch = {}
    for col in columns:
        out = torch.full((batch_size, seq_length), fills[col], dtype=torch.long)
        for r in range(batch_size):
            seq = rows[col][r % len(rows[col])][:seq_length]  # a small split repeats its examples
            out[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        batch[col] = out
    return batch


@contextlib.contextmanager
def _frozen_weights():
    import torch._inductor.config as inductor

    with inductor.patch(freezing=True):
        yield


class Runner:
    """A model called the way the report measures it: in inference mode, either eager or compiled by
    inductor with its weights frozen (constants folded and weights pre-packed, as CPU inference
    deployments run). Compiled is the default because it is the only way torchao's int8 matrix
    products are fast on CPUs without AVX512-VNNI: eager they fall back to a kernel ~16x slower than
    fp32. Every model of a report runs the same way, so the ratios compare like with like."""

    def __init__(self, model, compile: bool):
        self.model, self.fn, self.mode = model.eval(), model, "eager"
        if compile:
            # every model of a report stays compiled until all are timed: room for each one's graphs
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self.fn, self.mode = torch.compile(model, dynamic=False), "compiled"

    @torch.inference_mode()
    def __call__(self, batch: dict):
        if self.fn is self.model:
            return self.model(**batch)
        try:
            with _frozen_weights():
                return self.fn(**batch)
        except Exception as e:  # a model the compiler cannot take still gets measured, eager, and says so
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
            self.fn, self.mode = self.model, f"eager (torch.compile failed: {first})"
            return self.model(**batch)


def latencies_ms(runners: dict[str, Runner], batch: dict, repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median wall time of one forward pass over `batch` of each model, in milliseconds. The models
    take turns, one pass each per round, so that a change in the machine's speed during the
    measurement (other tenants, clock scaling) touches every model alike."""
    for runner in runners.values():
        for _ in range(warmup):  # the first pass compiles
            runner(batch)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, runner in runners.items():
            start = time.perf_counter()
            runner(batch)
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def outputs(runner: Runner, batch: dict) -> torch.Tensor:
    """The model's main output on `batch` (logits, else the last hidden states), in fp32."""
    out = runner(batch)
    value = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    return value.float()


def agreement(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Share of positions where the argmax of the two outputs is the same (for a classifier: the share of
    examples given the same label)."""
    return float((reference.argmax(-1) == other.argmax(-1)).float().mean())


def classification_metrics(runner: Runner, dataset, problem_type: str, pad_id: int, batch_size: int, length: int):
    """Test metrics of a sequence classifier (accuracy, macro F1, MCC as fine-tuning reports them) and its
    logits in dataset order (for agreement between models). Every batch has the same shape (`batch_size`
    examples padded to `length` tokens; the last batch is filled up with copies and those are dropped),
    so a compiled model compiles once."""
    from toolkit.data.examples import PaddedExamples
    from toolkit.finetuning import metrics as task_metrics

    examples = PaddedExamples(dataset, pad_id, pad_to=length)
    n = len(examples)
    logits = torch.empty(n, runner.model.config.num_labels)
    labels = torch.empty(n, dtype=torch.float32 if examples.regression else torch.long)
    for start in range(0, n, batch_size):
        indices = list(range(start, min(start + batch_size, n)))
        real = len(indices)
        batch = examples.__getitems__(indices + [indices[0]] * (batch_size - real))
        inputs = {k: batch[k] for k in PaddedExamples.COLUMNS if k in batch}
        logits[start : start + real] = runner(inputs).logits.float()[:real]
        labels[start : start + real] = batch["labels"][:real]
    return {"scores": task_metrics.compute(problem_type, logits, labels), "logits": logits}


def cosine(reference: torch.Tensor, other: torch.Tensor, attention_mask: torch.Tensor) -> float:
    """Mean cosine similarity of two models' output vectors over the real (not padding) positions."""
    keep = attention_mask.bool() if reference.dim() == 3 else torch.ones(reference.shape[0], dtype=torch.bool)
    return float(torch.nn.functional.cosine_similarity(reference[keep], other[keep], dim=-1).mean())


@torch.inference_mode()
def mlm_metrics(model, blocks, tokenizer, batch_size: int, seed: int = 0) -> dict:
    """Masked-LM loss and accuracy on packed blocks, eager; the masks depend only on the seed and the
    block, so every model is scored on the same masked positions."""
    from toolkit.config import ObjectiveArgs
    from toolkit.objectives.mlm import MaskedLM

    objective = MaskedLM(model, ObjectiveArgs()).eval()
    dataset = objective.make_dataset(blocks, split="eval")
    collate = objective.make_collator(tokenizer, seed, salt="eval")
    loss = correct = count = 0.0
    for start in range(0, len(dataset), batch_size):
        batch = collate(dataset.__getitems__(list(range(start, min(start + batch_size, len(dataset))))))
        losses, stats = objective(batch)
        loss += float(losses["mlm"])
        correct += float(stats["mlm_correct"])
        count += float(objective.counts(batch)["mlm"])
    return {"mlm_loss": loss / max(count, 1.0), "mlm_accuracy": correct / max(count, 1.0)}
