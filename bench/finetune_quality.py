"""Quality bar of the fine-tuning modes: the MiniLM BERT on movie-sentiment, as the demo runs it.

    python bench/finetune_quality.py [key=value ...]      # e.g. 'compare.modes=[frozen,full,prompt,lora]'

Runs `recipes/finetune-compare.yaml` (frozen, full and prompt tuning on the same data, model and
seed), prints the comparison table, the wall-clock and CPU time, and checks the bar of issue 4:
test accuracy of full fine-tuning >= 0.80 and of the frozen mode >= 0.70. Prompt tuning is
reported, not judged (small models do poorly with it). Exit status 1 when the bar is missed.
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BAR = {"full": 0.80, "frozen": 0.70}


def main(argv: list[str]) -> int:
    import toolkit

    overrides = ["output_dir=outputs/bench-finetune-quality", "training.overwrite_output_dir=true", *argv]
    wall = time.perf_counter()
    result = toolkit.compare(REPO / "recipes" / "finetune-compare.yaml", overrides)
    wall = time.perf_counter() - wall
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(f"\nwall {wall:.0f} s, CPU {usage.ru_utime + usage.ru_stime:.0f} s (user + system, all threads)")
    ok = True
    for row in result.rows:
        bar = BAR.get(row["mode"])
        verdict = "reported" if bar is None else ("PASS" if row["test_accuracy"] >= bar else "FAIL")
        ok &= verdict != "FAIL"
        print(
            f"{row['mode']:>8}: test accuracy {row['test_accuracy']:.3f}"
            + (f" (bar {bar})" if bar else "")
            + f" {verdict}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
