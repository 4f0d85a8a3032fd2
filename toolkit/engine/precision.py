"""Precision: trainable weights kept in fp32 under mixed precision, and skipped steps accounted for.

Two kinds of step are skipped without touching the weights or the schedule:
- the fp16 loss scaler's: the scaled gradients overflowed, the scale is lowered and the step
  dropped (accelerate's GradScaler, or DeepSpeed's dynamic loss scaler). Expected now and then;
  counted and logged.
- a non-finite loss, in any precision: the model or the data produced nan/inf before any scaling.
  Counted and logged; after `training.max_consecutive_nonfinite_steps` of them in a row the run
  stops, because it has diverged and more steps will not bring it back.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from toolkit.errors import ToolkitError


def upcast_trainable_params(model: torch.nn.Module, mixed_precision: str) -> int:
    """Under fp16/bf16 autocast the trainable weights must be fp32 (the optimizer's master copy):
    transformers 5 loads a checkpoint in the dtype it was saved in, and fp16 weights make the
    loss scaler fail with "Attempting to unscale FP16 gradients". Frozen weights stay as they are.
    Returns the number of tensors cast."""
    if mixed_precision not in ("fp16", "bf16"):
        return 0
    cast = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
            cast += 1
    return cast


@dataclass
class SkippedSteps:
    """Bookkeeping of skipped optimizer steps, saved in every checkpoint's trainer_state.json."""

    patience: int  # training.max_consecutive_nonfinite_steps
    nonfinite: int = 0  # steps skipped because the loss was nan/inf
    loss_scaler: int = 0  # steps skipped by the fp16 loss scaler
    nonfinite_in_a_row: int = 0

    def record(self, step: int, nonfinite_loss: bool, scaler_skipped: bool) -> bool:
        """Account for optimizer step `step`; True when the update was applied (so the schedule advances)."""
        if nonfinite_loss:
            self.nonfinite += 1
            self.nonfinite_in_a_row += 1
            if self.nonfinite_in_a_row >= self.patience:
                raise ToolkitError(
                    f"training stopped at step {step}: the loss was not finite (nan or inf) for {self.nonfinite_in_a_row} "
                    f"optimizer steps in a row (training.max_consecutive_nonfinite_steps={self.patience}); those steps were "
                    f"skipped, so the weights are those after step {step - self.nonfinite_in_a_row}. Lower "
                    "training.learning_rate or raise training.warmup_steps, prefer bf16 to fp16, check the data, then "
                    "resume from the last checkpoint (training.resume_from_checkpoint=auto)"
                )
            return False
        self.nonfinite_in_a_row = 0
        if scaler_skipped:
            self.loss_scaler += 1
            return False
        return True

    def state(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "patience"}

    def restore(self, state: dict) -> None:
        for k in ("nonfinite", "loss_scaler", "nonfinite_in_a_row"):
            setattr(self, k, int(state.get(k, 0)))
