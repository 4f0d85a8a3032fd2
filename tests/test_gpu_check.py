"""bench/gpu_check.py, the parts a CPU can check: FLOPs arithmetic, peaks, arguments, the launch plan."""

from __future__ import annotations

import importlib.util
import re

import pytest
from conftest import REPO

spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def test_bert_base_mlm_flops_per_token():
    # by hand: 12 layers x (4 x 768^2 + 2 x 768 x 3072) matmul weights = 84,934,656; x6 = 509,607,936
    # attention: 12 x 12 x 768 x 128 = 14,155,776; head at 15% of tokens: 0.15 x 6 x (768^2 + 768 x 30522) = 21,627,648
    flops = gpu_check.bert_mlm_flops_per_token(12, 768, 3072, 30522, 128, 0.15)
    assert flops == pytest.approx(509_607_936 + 14_155_776 + 21_627_648)
    # longer sequences cost more attention only
    assert gpu_check.bert_mlm_flops_per_token(12, 768, 3072, 30522, 512) - flops == pytest.approx(12 * 12 * 768 * 384)


def test_peak_and_utilisation():
    assert gpu_check.peak_tflops("NVIDIA H200") == 989.0
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_check.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_check.peak_tflops("Some Future Card") is None
    # 1e6 tokens/s x 0.5 GFLOP/token = 500 TFLOP/s = half of a 1000 TFLOP/s card
    assert gpu_check.mfu(1e6, 5e8, 1000.0) == pytest.approx(0.5)
    assert gpu_check.mfu(1e6, 5e8, 1000.0, gpus=2) == pytest.approx(0.25)


def test_arguments():
    args = gpu_check.parse_args(["--only", "bf16,zero3", "--steps", "30"])
    assert args.runs == ["bf16", "zero3"] and args.steps == 30
    assert gpu_check.parse_args([]).runs == ["bf16", "zero2", "zero3", "fp16", "fsdp", "tp2", "pp2"]
    for bad in (["--only", "zero4"], ["--steps", "5"]):
        with pytest.raises(SystemExit):
            gpu_check.parse_args(bad)


def test_the_plan_uses_the_shipped_launch_configs(capsys, tmp_path):
    assert gpu_check.main(["--dry-run", "--workdir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert re.match(r"BERT-base MLM, sequence 128, batch 32: 0\.545 GFLOP per token", lines[0])
    configs = [line.split("--config_file ")[1].split()[0] for line in lines[1:]]
    assert [c.rsplit("/", 1)[1] for c in configs] == [
        "single.yaml",
        "deepspeed-zero2.yaml",
        "deepspeed-zero3.yaml",
        "single.yaml",
        "fsdp.yaml",
        "multi-gpu.yaml",
        "multi-gpu.yaml",
    ]
    assert "--num_processes 2 " in lines[-2] and lines[-2].startswith("tp2 ")
    assert "--num_processes 2 " in lines[-1] and lines[-1].startswith("pp2 ")
    assert all((REPO / "recipes" / "accelerate" / c.rsplit("/", 1)[1]).is_file() for c in configs)
    recipe = gpu_check.recipe_for(gpu_check.parse_args([]), "fp16", tmp_path)
    assert recipe["training"]["mixed_precision"] == "fp16" and recipe["model"]["size"] == "base"
    assert "tensor_parallel_size" not in recipe["training"]
    assert gpu_check.recipe_for(gpu_check.parse_args([]), "tp2", tmp_path)["training"]["tensor_parallel_size"] == 2
    pp2 = gpu_check.recipe_for(gpu_check.parse_args([]), "pp2", tmp_path)
    assert (pp2["training"]["pipeline_parallel_size"], pp2["training"]["pipeline_micro_batches"]) == (2, 8)
    assert "pipeline_parallel_size" not in recipe["training"]


def test_table():
    rows = [
        {
            "run": "bf16",
            "engine": "single",
            "tokens_per_second": 100_000.0,
            "peak_memory_gib": 9.5,
            "loss": 7.1,
            "skipped_by_scaler": 0,
        },
        {"run": "fsdp", "error": "boom"},
    ]
    table = gpu_check.format_table(rows, 5e8, 1000.0)
    assert "bf16   single" in table and " 100000 " in table and "50.0" in table and "5.0%" in table
    assert "fsdp   FAILED: boom" in table
