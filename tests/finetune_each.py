"""Test helper: `toolkit finetune` on each recipe given, one after another, in one launch.

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 tests/finetune_each.py A.yaml B.yaml

Starting the processes (and importing torch and transformers) takes longer than a tiny fine-tuning run,
so several runs share one launch; each run is an ordinary `toolkit.finetune` of its recipe.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from toolkit.cli import main

    for recipe in sys.argv[1:]:
        code = main(["finetune", recipe])
        if code:
            sys.exit(code)
