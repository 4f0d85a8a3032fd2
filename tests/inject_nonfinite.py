"""Test helper: the `toolkit` CLI with a masked-LM objective whose loss is nan at chosen steps.

    TOOLKIT_TEST_NONFINITE_STEPS=3,5 accelerate launch ... tests/inject_nonfinite.py pretrain RECIPE ...

The steps are 1-based optimizer steps of a run with gradient_accumulation_steps=1 (one training
forward per step); the loss of every process is multiplied by nan there. Nothing else changes.
"""

from __future__ import annotations

import os
import sys

from toolkit.objectives import OBJECTIVES
from toolkit.objectives.mlm import MaskedLM


class NonFiniteMaskedLM(MaskedLM):
    nan_steps: frozenset[int] = frozenset()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.train_calls = 0

    def forward(self, batch):
        losses, stats = super().forward(batch)
        if self.training:
            self.train_calls += 1
            if self.train_calls in self.nan_steps:
                losses = {k: v * float("nan") for k, v in losses.items()}
        return losses, stats


def install(steps) -> None:
    NonFiniteMaskedLM.nan_steps = frozenset(int(s) for s in steps)
    OBJECTIVES["mlm"] = NonFiniteMaskedLM


if __name__ == "__main__":
    install(s for s in os.environ.get("TOOLKIT_TEST_NONFINITE_STEPS", "").split(",") if s)
    from toolkit.cli import main

    sys.exit(main())
