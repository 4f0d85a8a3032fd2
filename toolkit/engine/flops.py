"""Model FLOPs of a training step, counted analytically from what each objective runs, and the
peak they are measured against (model FLOPs utilisation, `mfu`).

Conventions (Kaplan et al. 2020; Chowdhery et al. 2022, PaLM, appendix B):

- Only matrix multiplications count: multiplying (n x k) by (k x m) is 2nkm FLOPs. Embedding
  lookups are indexing, not multiplication, and count nothing; so do biases, norms, activations,
  softmax, dropout, the loss and the optimizer (all elementwise, a few percent at most).
- A weight matrix of P entries applied at N positions costs 2PN forward. Training it costs 6PN:
  the backward pass computes the gradient of its input (2PN) and of its weight (2PN). A frozen
  matrix through which gradients still flow to trained parameters below (PEFT) costs 4PN;
  forward-only work costs 2PN.
- Attention, per layer, for one query position reading S key positions with width d (heads x head
  size): the scores Q K^T cost 2Sd and the weighted values A V another 2Sd forward, so 4Sd; the
  backward pass costs twice the forward (the gradients of both operands of both products), so
  training costs 3 x 4Sd = 6 x 2 x S x d per position and layer, 6 x 2 x layers x S^2 x d per
  sequence. Causal models count the whole S x S square, as PaLM does and as the kernels compute.
- Padded positions count: the matrix multiplications run on them. (`tokens_seen` counts tokens.)
- Gradient checkpointing's recomputed forward does not count: these are model FLOPs, so `mfu`
  compares runs whatever their memory savings (hardware FLOPs would add it).

What each objective runs (B sequences of S positions per micro-batch, M masked positions):

| objective     | trained (6x)                                                                        |
| ------------- | ----------------------------------------------------------------------------------- |
| mlm           | encoder at B x S; masked-LM head (transform + vocabulary projection) at the M only   |
| mlm+nsp, nsp  | encoder at B x S; pooler and NSP classifier at B; mlm+nsp: masked-LM head at M      |
| rtd (ELECTRA) | generator encoder at B x S and its masked-LM head at M; discriminator and its       |
|               | per-token head at B x S                                                             |
| clm           | decoder and the vocabulary projection at B x S                                      |
| classifier    | encoder at B x S (frozen base weights of PEFT modes 4x), head (pooler, classifier)  |
|               | at B; frozen mode: the head alone, on cached features                               |
| distillation  | the student as its objective above, plus the teacher's forward pass (2x) on the     |
|               | same positions (classifier: all; masked LM: encoder all, head at the M)             |

ELECTRA's sampling adds no forward-only work: the replacements are drawn by Gumbel-max from the
generator logits that the generator loss already needs (`objectives/electra.py`), with no matmul.
An encoder's own pooler that nothing reads (a masked-LM model loaded with one) runs forward only.
"""

from __future__ import annotations

import functools
import math
import re
import time
from dataclasses import dataclass

import torch
from torch import nn

# ---- counting the weights that multiply --------------------------------------------------------


@dataclass(frozen=True)
class Stack:
    """A transformer stack as the FLOP count sees it: the weight-matrix entries applied at every
    position (trained and frozen) and the attention's depth and width."""

    trained: int
    frozen: int
    layers: int
    width: int  # attention width: query heads x head size


def matmul_weights(module: nn.Module | None, skip: tuple[str, ...] = (), trained: bool | None = None) -> int:
    """Entries of the weight matrices that `module` multiplies by: each `nn.Linear` (PEFT's LoRA
    layers and bitsandbytes' 4-bit layers are ones) and transformers' `Conv1D` (GPT-2), each module
    once. Sizes come from the layer's shape, not its tensor, so sharded (ZeRO-3, FSDP) and
    quantized weights count in full. Sub-modules with a name part in `skip` are left out;
    `trained` True/False counts only weights that do / do not require gradients."""
    if module is None:
        return 0
    from transformers.pytorch_utils import Conv1D

    total = 0
    for name, m in module.named_modules():
        if skip and set(name.split(".")) & set(skip):
            continue
        if isinstance(m, nn.Linear):
            size = m.in_features * m.out_features
        elif isinstance(m, Conv1D):
            size = m.nx * m.nf
        else:
            continue
        if trained is None or m.weight.requires_grad == trained:
            total += size
    return total


def stack_of(model: nn.Module, skip: tuple[str, ...] = ("pooler",), extra: nn.Module | None = None) -> Stack:
    """The stack of a transformers base model (embeddings, layers; `extra` modules also applied at
    every position, such as ELECTRA's per-token head), its pooler left out."""
    config = model.config
    heads = config.num_attention_heads
    head_size = getattr(config, "head_dim", None) or config.hidden_size // heads
    return Stack(
        trained=matmul_weights(model, skip, trained=True) + matmul_weights(extra, trained=True),
        frozen=matmul_weights(model, skip, trained=False) + matmul_weights(extra, trained=False),
        layers=config.num_hidden_layers,
        width=heads * head_size,
    )


# ---- pure counts ---------------------------------------------------------------------------------


def dense(weights: int, positions: int, factor: int = 6) -> float:
    """Weight matrices of `weights` entries at `positions`: 6x trained, 4x frozen on the gradient
    path, 2x forward only."""
    return float(factor) * weights * positions


def attention(stack: Stack, sequences: int, queries: int, keys: int | None = None, factor: int = 6) -> float:
    """Scores and weighted values of every layer: factor x 2 x layers x keys x width per query position
    (factor 6 when training, 2 forward only)."""
    keys = queries if keys is None else keys
    return float(factor) * 2 * stack.layers * keys * stack.width * queries * sequences


def encoder(stack: Stack, sequences: int, length: int, keys: int | None = None) -> float:
    """A training pass of the stack over `sequences` x `length` positions (frozen weights 4x)."""
    positions = sequences * length
    return (
        dense(stack.trained, positions) + dense(stack.frozen, positions, 4) + attention(stack, sequences, length, keys)
    )


def forward(stack: Stack, sequences: int, length: int) -> float:
    """A forward pass of the stack alone (a distillation teacher): 2x every weight, attention 2x."""
    return dense(stack.trained + stack.frozen, sequences * length, 2) + attention(stack, sequences, length, factor=2)


def masked_lm(stack: Stack, head: int, sequences: int, length: int, masked: int, pooler: int = 0) -> float:
    """mlm: the encoder everywhere, the masked-LM head (transform + vocabulary projection) at the
    masked positions only (`objectives/mlm.py` selects them first); an unread pooler forward only."""
    return encoder(stack, sequences, length) + dense(head, masked) + dense(pooler, sequences, 2)


def next_sentence(
    stack: Stack, pooler: int, classifier: int, sequences: int, length: int, mlm_head: int = 0, masked: int = 0
) -> float:
    """nsp and mlm+nsp: the encoder everywhere, pooler and NSP classifier on [CLS], and (mlm+nsp)
    the masked-LM head at the masked positions."""
    return encoder(stack, sequences, length) + dense(pooler + classifier, sequences) + dense(mlm_head, masked)


def replaced_token_detection(
    generator: Stack, generator_head: int, discriminator: Stack, sequences: int, length: int, masked: int
) -> float:
    """rtd: the generator everywhere and its masked-LM head at the masked positions; the
    discriminator (its per-token head included in the stack) everywhere. Both train."""
    return masked_lm(generator, generator_head, sequences, length, masked) + encoder(discriminator, sequences, length)


def causal_lm(stack: Stack, head: int, sequences: int, length: int) -> float:
    """clm: the decoder and the vocabulary projection at every position."""
    return encoder(stack, sequences, length) + dense(head, sequences * length)


def sequence_classification(
    stack: Stack, head: int, sequences: int, length: int, keys: int | None = None, frozen_head: int = 0
) -> float:
    """A classifier: the encoder everywhere (`keys` > `length` when prefix tuning adds key/value
    positions), the head (pooler + classifier) once per sequence (`frozen_head` of it 4x)."""
    return encoder(stack, sequences, length, keys) + dense(head, sequences) + dense(frozen_head, sequences, 4)


def batch_shape(batch: dict) -> tuple[int, int, int]:
    """(sequences, positions per sequence, masked positions) of a micro-batch."""
    sequences, length = batch["input_ids"].shape[:2]
    labels = batch.get("labels")
    masked = int((labels != -100).sum()) if labels is not None and labels.shape == batch["input_ids"].shape else 0
    return int(sequences), int(length), masked


def schedule_steps(max_flops: float, step_flops: float) -> int:
    """Optimizer steps that a FLOP budget buys at `step_flops` per step (at least one)."""
    return max(1, math.ceil(max_flops / step_flops))


# ---- peak and utilisation ----------------------------------------------------------------------

# Dense bf16/fp16 tensor-core peaks of one device, FLOP/s (vendor datasheets, no sparsity), matched
# against torch.cuda.get_device_name() in this order (the more specific names first).
GPU_PEAKS: tuple[tuple[str, float], ...] = (
    (r"GH200", 989e12),
    (r"H200 NVL", 835e12),
    (r"H200", 989e12),
    (r"H100 PCIe", 756e12),
    (r"H100 NVL", 835e12),
    (r"H100|H800", 989e12),
    (r"B200", 2250e12),
    (r"A100|A800", 312e12),
    (r"L40S", 362e12),
    (r"L40\b", 181e12),
    (r"\bL4\b", 121e12),
    (r"\bA10\b", 125e12),
    (r"V100-PCIE", 112e12),
    (r"V100", 125e12),
    (r"\bT4\b", 65e12),
    (r"MI300X|MI325X", 1307e12),
    (r"MI250X", 383e12),
)


def gpu_peak(name: str) -> float | None:
    """The table's peak for a device name ('NVIDIA H100 80GB HBM3'), or None when unknown."""
    for pattern, peak in GPU_PEAKS:
        if re.search(pattern, name):
            return peak
    return None


@functools.cache
def measured_cpu_peak(size: int = 1024, budget_s: float = 0.25) -> float:
    """FLOP/s of an fp32 (size x size) matrix multiply on this CPU with torch's threads: the best
    of up to 3 timed runs (fewer once `budget_s` is spent) after a small warm-up; measured once per
    process, in about 0.3 s on this 2-core CPU. Its own generator: the global RNG drives dropout, and a
    resumed run measures this after restoring it."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(size, size, generator=g), torch.randn(size, size, generator=g)
    a[:256, :256] @ b[:256, :256]  # thread pool and allocator warm
    best, spent = math.inf, 0.0
    for _ in range(3):
        start = time.perf_counter()
        a @ b
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
        if spent > budget_s:
            break
    return 2 * size**3 / max(best, 1e-9)


def device_peak(device: torch.device, override: float | None = None) -> tuple[float | None, str]:
    """(peak FLOP/s of one device, where it comes from): `training.peak_flops`, the GPU table (the
    bf16 peak whatever the run's precision: the usual MFU reference), or a matmul probe on CPU; None
    for a GPU not in the table."""
    if override is not None:
        return override, "training.peak_flops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak(name)
        return peak, (f"{name} bf16 dense peak" if peak else f"{name}: no known peak")
    if device.type == "cpu":
        return measured_cpu_peak(), "fp32 matmul probe"
    return None, f"{device.type}: no known peak"


class FlopMeter:
    """FLOPs of the run so far (`train_flops`, restored on resume) and of the steps since the last
    log line, with their model FLOPs utilisation: achieved FLOP/s over the peak of all devices."""

    def __init__(self, peak: float | None, devices: int, total: float = 0.0):
        self.peak, self.devices, self.total = peak, devices, total
        self.flops, self.seconds, self.steps = 0.0, 0.0, 0

    def add(self, step_flops: float, seconds: float) -> None:
        self.total += step_flops
        self.flops += step_flops
        self.seconds += seconds
        self.steps += 1

    def interval(self) -> dict[str, float]:
        """step_flops (mean per step since the last call), train_flops, and mfu when the peak is known."""
        out = {"step_flops": self.flops / max(self.steps, 1), "train_flops": self.total}
        if self.peak:
            out["mfu"] = self.flops / max(self.seconds, 1e-9) / (self.peak * self.devices)
        self.flops, self.seconds, self.steps = 0.0, 0.0, 0
        return out
