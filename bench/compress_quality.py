"""Quality bar of compression: the MiniLM BERT fully fine-tuned on movie-sentiment, then compressed.

    python bench/compress_quality.py [--teacher FOLDER]

Fine-tunes the teacher with `recipes/finetune-full.yaml` (skipped with --teacher), then runs the three
shipped compression recipes on it and checks the bar of issue 6:

- int8 dynamic quantization loses at most 1 point of test accuracy and is faster than fp32 on this
  CPU (the latency ratio is printed);
- 50% unstructured pruning with one epoch of recovery fine-tuning loses at most 2 points;
- a distilled 3-layer student beats the same student trained without a teacher on the same data and
  budget.

Every figure is printed whatever it is; exit status 1 when a bar is missed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "outputs" / "bench-compress"


def main(argv: list[str]) -> int:
    import toolkit

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", help="a fine-tuned movie-sentiment classifier (default: fine-tune one)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    teacher = args.teacher
    if teacher is None:
        teacher = str(OUT / "finetune-full")
        toolkit.finetune(
            REPO / "recipes" / "finetune-full.yaml", output_dir=teacher, training__overwrite_output_dir=True
        )
    common = {"model.model_name_or_path": teacher, "training.overwrite_output_dir": True}
    runs = {}
    for method in ("quantize", "prune", "distill"):
        overrides = {**common, "output_dir": str(OUT / method)}
        if method == "distill":
            overrides = {
                "compress.teacher": teacher,
                "training.overwrite_output_dir": True,
                "output_dir": str(OUT / method),
            }
        runs[method] = {
            r.name: r for r in toolkit.compress(REPO / "recipes" / f"compress-{method}.yaml", overrides).rows
        }

    checks = []
    q = runs["quantize"]
    drop = q["original"].metrics["accuracy"] - q["int8_dynamic"].metrics["accuracy"]
    speed = q["original"].latency_ms / q["int8_dynamic"].latency_ms
    checks.append((f"int8 dynamic: accuracy drop {100 * drop:.2f} points (bar <= 1)", drop <= 0.01))
    checks.append((f"int8 dynamic: {speed:.2f}x the fp32 speed on this CPU (bar > 1)", speed > 1.0))
    p = runs["prune"]
    drop = p["original"].metrics["accuracy"] - p["pruned-recovered"].metrics["accuracy"]
    before = p["original"].metrics["accuracy"] - p["pruned"].metrics["accuracy"]
    checks.append(
        (
            f"50% pruning + recovery: accuracy drop {100 * drop:.2f} points (bar <= 2; {100 * before:.2f} before "
            "recovery)",
            drop <= 0.02,
        )
    )
    d = runs["distill"]
    student, baseline = d["student"].metrics["accuracy"], d["baseline"].metrics["accuracy"]
    checks.append(
        (
            f"distilled 3-layer student {student:.4f} vs the same student without a teacher {baseline:.4f} "
            f"(teacher {d['teacher'].metrics['accuracy']:.4f})",
            student > baseline,
        )
    )
    print(f"\n---- quality bar (wall {time.perf_counter() - start:.0f} s)")
    for text, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
