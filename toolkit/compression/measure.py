"""What the report measures of each model: parameters, non-zero parameters, size on disk, CPU latency,
quality on the task (test accuracy / F1, or masked-LM loss on held-out text) and agreement with the
original model's outputs.

Every model is measured the same way, on the CPU, in inference mode: latency is the median over
`report.latency_repeats` timed runs of one batch of `latency_batch_size` test examples padded to
`latency_seq_length` tokens, after three warm-up runs.
"""

from __future__ import annotations

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
    rows = split.select(range(min(batch_size, len(split))))
    while len(rows["input_ids"]) < batch_size:  # a small split: repeat examples up to the batch size
        rows = {k: (rows[k] + rows[k]) for k in ("input_ids", "attention_mask")}
    batch = {}
    for col, fill in (("input_ids", tokenizer.pad_token_id), ("attention_mask", 0), ("token_type_ids", 0)):
        if col not in rows.keys() if isinstance(rows, dict) else col not in rows.column_names:
            continue
        out = torch.full((batch_size, seq_length), fill, dtype=torch.long)
        for r, seq in enumerate(list(rows[col])[:batch_size]):
            seq = seq[:seq_length]
            out[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        batch[col] = out
    return batch


@torch.inference_mode()
def latency_ms(model, batch: dict, repeats: int, warmup: int = 3) -> float:
    """Median wall time of one forward pass over `batch`, in milliseconds."""
    model.eval()
    for _ in range(warmup):
        model(**batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(**batch)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


@torch.inference_mode()
def outputs(model, batch: dict) -> torch.Tensor:
    """The model's main output on `batch` (logits, else the last hidden states), in fp32."""
    model.eval()
    out = model(**batch)
    value = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    return value.float()


def agreement(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Share of positions where the argmax of the two outputs is the same (for a classifier: the share of
    examples given the same label)."""
    return float((reference.argmax(-1) == other.argmax(-1)).float().mean())


@torch.inference_mode()
def classification_metrics(model, dataset, problem_type: str, pad_id: int, batch_size: int) -> dict:
    """Test metrics of a sequence classifier (accuracy, macro F1, ... as fine-tuning reports them), and
    the logits in dataset order (for agreement between models)."""
    from toolkit.finetuning import metrics as task_metrics
    from toolkit.finetuning.objective import PaddedExamples

    model.eval()
    examples = PaddedExamples(dataset, pad_id, longest_first=True)
    logits = torch.empty(len(examples), model.config.num_labels)
    labels = torch.empty(len(examples), dtype=torch.float32 if examples.regression else torch.long)
    for start in range(0, len(examples), batch_size):
        batch = examples.__getitems__(list(range(start, min(start + batch_size, len(examples)))))
        inputs = {k: batch[k] for k in PaddedExamples.COLUMNS if k in batch}
        logits[batch["idx"]] = model(**inputs).logits.float()
        labels[batch["idx"]] = batch["labels"]
    scores = task_metrics.compute(problem_type, logits, labels)
    if problem_type != "regression":
        scores["accuracy"] = float((logits.argmax(-1) == labels).float().mean())
    return {"scores": scores, "logits": logits}


def cosine(reference: torch.Tensor, other: torch.Tensor, attention_mask: torch.Tensor) -> float:
    """Mean cosine similarity of two models' output vectors over the real (not padding) positions."""
    keep = attention_mask.bool() if reference.dim() == 3 else torch.ones(reference.shape[0], dtype=torch.bool)
    return float(torch.nn.functional.cosine_similarity(reference[keep], other[keep], dim=-1).mean())


@torch.inference_mode()
def mlm_metrics(model, blocks, tokenizer, batch_size: int, seed: int = 0) -> dict:
    """Masked-LM loss and accuracy on packed blocks; the masks depend only on the seed and the block,
    so every model is scored on the same masked positions."""
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
