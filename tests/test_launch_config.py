"""Launch checks and DeepSpeed configs, without launching: "auto" values are filled from the recipe,
contradictions are refused with a clear message, and launches that give less than asked are refused."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType
from conftest import REPO

from toolkit.config import TrainingArgs
from toolkit.engine.distributed import accelerator_kwargs, check_deepspeed_file, check_launch, fill_deepspeed_config
from toolkit.errors import ToolkitError
from toolkit.recipes import validate_file

ZERO3 = json.loads((REPO / "recipes/accelerate/deepspeed/zero3.json").read_text())


def recipe(**kw) -> TrainingArgs:
    base = dict(per_device_train_batch_size=8, gradient_accumulation_steps=2, max_grad_norm=0.5, learning_rate=3e-4)
    return TrainingArgs(**{**base, **kw})


def test_auto_values_are_filled_from_the_recipe():
    config = copy.deepcopy(ZERO3)
    config["optimizer"] = {"type": "AdamW", "params": {k: "auto" for k in ("lr", "betas", "eps", "weight_decay")}}
    fill_deepspeed_config(config, recipe(weight_decay=0.1), world=4, hidden_size=256)
    assert config["train_micro_batch_size_per_gpu"] == 8
    assert config["gradient_accumulation_steps"] == 2
    assert config["train_batch_size"] == 8 * 2 * 4
    assert config["gradient_clipping"] == 0.5
    assert config["optimizer"]["params"] == {"lr": 3e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.1}
    zero = config["zero_optimization"]
    assert zero["reduce_bucket_size"] == 256 * 256 and zero["stage3_param_persistence_threshold"] == 2560
    assert config["bf16"]["enabled"] is False and config["fp16"]["enabled"] is False
    assert "auto" not in json.dumps(config)


def test_numbers_that_agree_with_the_recipe_and_tuning_knobs_are_kept():
    config = copy.deepcopy(ZERO3)
    config.update(train_micro_batch_size_per_gpu=8, train_batch_size=32)
    config["zero_optimization"]["reduce_bucket_size"] = 12345  # a tuning knob, not a recipe setting
    fill_deepspeed_config(config, recipe(), world=2, hidden_size=256)
    assert config["zero_optimization"]["reduce_bucket_size"] == 12345 and config["train_batch_size"] == 32


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"train_micro_batch_size_per_gpu": 4},
            r"sets train_micro_batch_size_per_gpu=4 but the recipe gives 8 \(training.per_device_train_batch_size\)",
        ),
        ({"train_batch_size": 64}, r"sets train_batch_size=64 but the recipe gives 32"),
        ({"gradient_accumulation_steps": 1}, r"sets gradient_accumulation_steps=1 but the recipe gives 2"),
        ({"gradient_clipping": 1.0}, r"sets gradient_clipping=1.0 but the recipe gives 0.5 \(training.max_grad_norm\)"),
        (
            {"bf16": {"enabled": True}},
            r"sets bf16.enabled=True but the recipe gives False \(training.mixed_precision\)",
        ),
        ({"scheduler": {"type": "WarmupLR"}}, "has a scheduler section"),
        ({"zero_optimization": {"stage": 0}}, "stage 0 is plain data parallelism"),
        (
            {"optimizer": {"type": "Lamb"}},
            "asks for DeepSpeed's Lamb optimizer but the recipe says training.optimizer=adamw",
        ),
        (
            {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}},
            r"sets optimizer.params.lr=0.001 but the recipe gives 0.0003",
        ),
        ({"steps": "auto"}, r"cannot fill \"auto\" for steps"),
    ],
)
def test_contradictions_with_the_recipe_are_refused(change, message):
    config = {**copy.deepcopy(ZERO3), **change}
    with pytest.raises(ToolkitError, match=message):
        fill_deepspeed_config(config, recipe(), world=2, hidden_size=256)


def test_optimizer_rules_under_deepspeed():
    offload = json.loads((REPO / "recipes/accelerate/deepspeed/zero3-offload.json").read_text())
    with pytest.raises(ToolkitError, match="would silently become Adam"):
        fill_deepspeed_config(copy.deepcopy(offload), recipe(optimizer="lamb"), world=2)
    fill_deepspeed_config(copy.deepcopy(offload), recipe(optimizer="adamw"), world=2)  # CPU Adam is AdamW
    lamb = {**copy.deepcopy(ZERO3), "optimizer": {"type": "Lamb", "params": {"max_grad_norm": 1.0}}}
    with pytest.raises(ToolkitError, match="clips gradients itself"):
        fill_deepspeed_config(lamb, recipe(optimizer="lamb"), world=2)
    fill_deepspeed_config(lamb, recipe(optimizer="lamb", max_grad_norm=0.0), world=2)


def test_the_file_as_written_decides_what_the_user_set():
    live = {**copy.deepcopy(ZERO3), "gradient_accumulation_steps": 1}  # accelerate inserts 1 when absent
    written = {k: v for k, v in copy.deepcopy(ZERO3).items() if k != "gradient_accumulation_steps"}
    fill_deepspeed_config(live, recipe(), world=2, written=written)
    assert live["gradient_accumulation_steps"] == 2


def test_shipped_file_validation_catches_a_misspelt_key_and_a_fixed_batch(tmp_path):
    bad = copy.deepcopy(ZERO3)
    bad["zero_optimization"]["overlap_com"] = True
    (tmp_path / "typo.json").write_text(json.dumps(bad))
    with pytest.raises(ToolkitError, match="DeepSpeed rejects the config.*overlap_com"):
        validate_file(tmp_path / "typo.json")
    (tmp_path / "fixed.json").write_text(json.dumps({**ZERO3, "train_micro_batch_size_per_gpu": 16}))
    with pytest.raises(ToolkitError, match='set it to "auto"'):
        validate_file(tmp_path / "fixed.json")


def fake(num_processes, kind):
    return SimpleNamespace(num_processes=num_processes, distributed_type=kind)


@pytest.mark.parametrize(
    "env, accelerator, message",
    [
        ({"WORLD_SIZE": "2"}, fake(1, DistributedType.NO), "started 2 processes but only 1 joined"),
        (
            {"MASTER_PORT": "29500", "ACCELERATE_MIXED_PRECISION": "no"},
            fake(1, DistributedType.NO),
            "asked for several processes but started only one",
        ),
        (
            {"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true"},
            fake(2, DistributedType.MULTI_CPU),
            r"asked for FSDP but accelerate set up MULTI_CPU \(2 process\(es\)\)",
        ),
        (
            {"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true"},
            fake(2, DistributedType.MULTI_CPU),
            "asked for DeepSpeed",
        ),
    ],
)
def test_launches_that_give_less_than_asked_are_refused(env, accelerator, message):
    with pytest.raises(ToolkitError, match=message):
        check_launch(accelerator, env)


def test_launches_that_give_what_was_asked_pass():
    check_launch(fake(1, DistributedType.NO), {})
    check_launch(fake(1, DistributedType.NO), {"ACCELERATE_MIXED_PRECISION": "no"})  # accelerate launch, 1 process
    check_launch(fake(2, DistributedType.MULTI_CPU), {"WORLD_SIZE": "2", "MASTER_PORT": "29500"})
    check_launch(fake(2, DistributedType.DEEPSPEED), {"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true"})


def test_cpu_processes_are_told_to_use_the_cpu_and_gloo():
    assert accelerator_kwargs({}) == {}
    ddp = accelerator_kwargs({"WORLD_SIZE": "2"})
    assert ddp["cpu"] is True and ddp["kwargs_handlers"][0].backend == "gloo"
    ds = accelerator_kwargs({"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true"})
    assert "cpu" not in ds and ds["kwargs_handlers"][0].backend == "gloo"  # DeepSpeed must not get cpu=True


def test_a_missing_deepspeed_file_is_named(tmp_path):
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(tmp_path / "nope.json")}
    with pytest.raises(ToolkitError, match="names the DeepSpeed file .*nope.json', which does not exist"):
        check_deepspeed_file(env)
    check_deepspeed_file(
        {**env, "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(REPO / "recipes/accelerate/deepspeed/zero2.json")}
    )
