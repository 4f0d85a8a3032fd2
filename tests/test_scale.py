"""Scale-out on CPU with 2 processes, through the shipped launch configs.

DDP, DeepSpeed ZeRO-2 and ZeRO-3 give the same per-step loss curve (a nan loss injected at step 3
is skipped by all of them); the ZeRO-3 final folder is an ordinary model with full-size, tied
weights equal to DeepSpeed's own reconstruction; a ZeRO-2 run resumed from its step-4 checkpoint
continues the same curve; launches that give less than they asked for are refused.

Tolerances: the runs differ only in how gradients are reduced (float sums in another order), so
per-step losses agree to ~1e-6; the bounds below leave two orders of magnitude of margin while
staying far below the step-to-step change of the loss (~1e-2).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import yaml
from conftest import REPO, run_cli, tiny_bert_recipe

from toolkit.engine.checkpoint import complete_checkpoints, read_state
from toolkit.engine.tracking import read_metrics

pytestmark = pytest.mark.multiproc

NAN_STEP = 3
MAX_DIFF, MEAN_DIFF = 1e-4, 2e-5  # largest and mean per-step |loss difference| between launches


def launch(launch_args: list[str], *args: str, port: int, nan_steps: str = str(NAN_STEP)):
    """`accelerate launch LAUNCH_ARGS tests/inject_nonfinite.py ARGS` from the repository root."""
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOOLKIT_TEST_NONFINITE_STEPS": nan_steps}
    env.pop("ACCELERATE_USE_CPU", None)  # the shipped configs must work without it
    cmd = [accelerate, "launch", *launch_args, "--main_process_port", str(port), "tests/inject_nonfinite.py", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def config(name: str) -> list[str]:
    return ["--config_file", f"recipes/accelerate/{name}.yaml", "--num_processes", "2"]


def curve(out) -> dict[int, float]:
    """step -> training loss (nan where the loss was not finite)."""
    return {m["step"]: float(m["loss"]) for m in read_metrics(out) if "loss" in m}


def assert_same_curve(got: dict, ref: dict, max_diff=MAX_DIFF, mean_diff=MEAN_DIFF) -> None:
    assert sorted(got) == sorted(ref)
    assert [s for s in ref if math.isnan(ref[s])] == [s for s in got if math.isnan(got[s])]
    diffs = [abs(got[s] - ref[s]) for s in ref if not math.isnan(ref[s])]
    assert max(diffs) < max_diff, diffs
    assert sum(diffs) / len(diffs) < mean_diff, diffs


def final_state(out) -> dict:
    return read_state(complete_checkpoints(out)[-1][1])


@pytest.fixture(scope="module")
def recipe_path(tmp_path_factory, corpus_dir, wordpiece_dir):
    recipe = tiny_bert_recipe(
        "unused", corpus_dir, wordpiece_dir, max_steps=8, per_device_train_batch_size=4, eval_on_start=False
    )
    recipe["training"].update(save_steps=4, max_eval_batches=1)
    path = tmp_path_factory.mktemp("scale") / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def ddp_run(recipe_path):
    out = recipe_path.parent / "ddp"
    run = launch(config("multi-cpu"), "pretrain", str(recipe_path), f"output_dir={out}", port=29541)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def test_ddp_uses_two_processes_and_skips_the_nonfinite_step(ddp_run):
    state = final_state(ddp_run)
    assert state["world_size"] == 2 and state["engine"] == "ddp"
    assert state["skipped_steps"] == {"nonfinite": 1, "loss_scaler": 0, "nonfinite_in_a_row": 0}
    logged = {m["step"]: m for m in read_metrics(ddp_run) if "loss" in m}
    assert logged[NAN_STEP]["loss"] == "nan" and logged[NAN_STEP]["skipped_nonfinite"] == 1
    # the schedule did not move on the skipped step, and moved on again after it (warmup 2, linear decay)
    lr = {s: m["learning_rate"] for s, m in logged.items()}
    assert lr[NAN_STEP] == lr[NAN_STEP - 1] and lr[NAN_STEP + 1] < lr[NAN_STEP]
    assert all(not math.isnan(v) for s, v in curve(ddp_run).items() if s != NAN_STEP)


def test_zero2_matches_ddp_and_resumes_on_the_same_curve(ddp_run, recipe_path):
    out = recipe_path.parent / "zero2"
    run = launch(config("deepspeed-zero2"), "pretrain", str(recipe_path), f"output_dir={out}", port=29542)
    assert run.returncode == 0, run.stderr[-3000:]
    state = final_state(out)
    assert state["world_size"] == 2 and state["engine"] == "deepspeed-zero2"
    assert state["skipped_steps"]["nonfinite"] == 1
    assert_same_curve(curve(out), curve(ddp_run))

    # resume from the step-4 checkpoint into a new folder: steps 5-8 repeat the uninterrupted run's
    resumed = recipe_path.parent / "zero2-resumed"
    checkpoint = out / "checkpoints" / "checkpoint-4"
    run = launch(
        config("deepspeed-zero2"),
        "pretrain",
        str(recipe_path),
        f"output_dir={resumed}",
        f"training.resume_from_checkpoint={checkpoint}",
        port=29543,
        nan_steps="",  # the nan step (3) lies before the checkpoint
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "resumed at step 4" in run.stdout
    assert read_state(checkpoint)["engine"] == "deepspeed-zero2"
    full = {s: v for s, v in curve(out).items() if s > 4}
    assert_same_curve(curve(resumed), full, max_diff=1e-6, mean_diff=1e-6)
    assert final_state(resumed)["skipped_steps"]["nonfinite"] == 1  # carried over from the checkpoint

    # under another engine and world size: refused, naming both, before any step
    other = run_cli(
        "pretrain",
        str(recipe_path),
        f"output_dir={recipe_path.parent / 'zero2-as-single'}",
        f"training.resume_from_checkpoint={checkpoint}",
    )
    assert other.returncode == 2
    assert "world_size (2 -> 1)" in other.stderr and "engine (deepspeed-zero2 -> single)" in other.stderr


def test_zero3_matches_ddp_and_saves_full_tied_weights(ddp_run, recipe_path):
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForMaskedLM

    out = recipe_path.parent / "zero3"
    run = launch(config("deepspeed-zero3"), "pretrain", str(recipe_path), f"output_dir={out}", port=29544)
    assert run.returncode == 0, run.stderr[-3000:]
    state = final_state(out)
    assert state["world_size"] == 2 and state["engine"] == "deepspeed-zero3"
    assert_same_curve(curve(out), curve(ddp_run))

    # the final folder: plain transformers, full-size weights, decoder still tied to the embeddings
    model = AutoModelForMaskedLM.from_pretrained(out)
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    embeddings = model.bert.embeddings.word_embeddings.weight
    assert embeddings.shape == (vocab, hidden) and embeddings.abs().sum() > 0
    assert model.cls.predictions.decoder.weight is embeddings
    # equal to DeepSpeed's own reconstruction of the sharded checkpoint of the same step
    gathered = get_fp32_state_dict_from_zero_checkpoint(str(complete_checkpoints(out)[-1][1]))
    saved = model.state_dict()
    for key, value in gathered.items():
        key = key.removeprefix("model.")
        assert saved[key].shape == value.shape, key
        assert torch.equal(saved[key].float(), value.float()), key
    assert [n for n, _ in model.named_parameters() if f"model.{n}" not in gathered] == []
    with (out / "config.json").open() as fh:
        assert json.load(fh).get("tie_word_embeddings", True)


def test_fsdp_on_cpu_is_refused_not_run_as_ddp(recipe_path):
    out = recipe_path.parent / "fsdp"
    run = launch(config("fsdp"), "pretrain", str(recipe_path), f"output_dir={out}", port=29545)
    assert run.returncode != 0
    assert "the launch asked for FSDP but accelerate set up" in run.stderr
    assert "(2 process(es))" in run.stderr  # both processes came up, and both refused
    assert not out.exists()  # refused before anything was written


def test_one_process_started_for_two_is_refused(recipe_path):
    out = recipe_path.parent / "cpu-flag"
    run = launch(["--cpu", "--num_processes", "2"], "pretrain", str(recipe_path), f"output_dir={out}", port=29546)
    assert run.returncode != 0
    assert "asked for several processes but started only one" in run.stderr
    assert not out.exists()


@pytest.mark.slow  # compiles DeepSpeed's CPU Adam / fused Adam once (about 1-2 minutes each)
@pytest.mark.parametrize(
    "name, optimizer_class",
    [
        ("deepspeed-zero3-offload", "deepspeed.ops.adam.cpu_adam.DeepSpeedCPUAdam"),
        ("zero2-with-optimizer-section", "deepspeed.ops.adam.fused_adam.FusedAdam"),
    ],
)
def test_deepspeed_runs_its_own_optimizer_and_matches_ddp(ddp_run, recipe_path, name, optimizer_class):
    """ZeRO-Offload swaps AdamW for DeepSpeed's CPU Adam; an optimizer section in the DeepSpeed file makes
    DeepSpeed build its own (here its fused Adam, in AdamW mode), with "auto" hyperparameters from the recipe."""
    if name.startswith("deepspeed-"):
        launch_args = config(name)
    else:
        ds = json.loads((REPO / "recipes/accelerate/deepspeed/zero2.json").read_text())
        ds["optimizer"] = {"type": "AdamW", "params": {k: "auto" for k in ("lr", "betas", "eps", "weight_decay")}}
        ds_path = recipe_path.parent / f"{name}.json"
        ds_path.write_text(json.dumps(ds))
        accelerate_config = yaml.safe_load((REPO / "recipes/accelerate/deepspeed-zero2.yaml").read_text())
        accelerate_config["deepspeed_config"]["deepspeed_config_file"] = str(ds_path)
        config_path = recipe_path.parent / f"{name}.yaml"
        config_path.write_text(yaml.safe_dump(accelerate_config))
        launch_args = ["--config_file", str(config_path), "--num_processes", "2"]
    out = recipe_path.parent / name
    run = launch(launch_args, "pretrain", str(recipe_path), f"output_dir={out}", port=29547)
    assert run.returncode == 0, run.stderr[-3000:]
    state = final_state(out)
    assert state["world_size"] == 2 and state["optimizer_class"] == optimizer_class
    assert_same_curve(curve(out), curve(ddp_run))
