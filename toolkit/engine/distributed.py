"""The launch: what the launcher started, checked against what was asked; DeepSpeed's config filled
from the recipe; full weights gathered from shards.

The recipe owns the training settings (batch, accumulation, clipping, optimizer, precision) and the
launch config owns the layout (processes, DDP / DeepSpeed ZeRO / FSDP). A DeepSpeed JSON file may
say `"auto"` for a training setting, and the toolkit fills it from the recipe; a concrete value
that contradicts the recipe is an error, never a silent override. Launches that quietly give less
than was asked (one process instead of N, DDP instead of FSDP) are errors too.
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from pathlib import Path

import torch

from toolkit.errors import ToolkitError

CPU_LAUNCH = "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N -m toolkit ..."

# training.optimizer -> the DeepSpeed optimizer types of the same algorithm (lower case)
DEEPSPEED_OPTIMIZERS = {
    "adamw": ("adam", "adamw", "onebitadam", "zerooneadam"),
    "lamb": ("lamb", "onebitlamb"),
    "adamw_8bit": (),
}


def _flag(env, name: str) -> bool:
    return env.get(name, "false").lower() in ("1", "true", "yes")


def has_accelerator_device() -> bool:
    if torch.cuda.is_available():
        return True
    probe = getattr(torch, "accelerator", None)
    return bool(probe is not None and probe.is_available())


def accelerator_kwargs(env=None) -> dict:
    """Arguments for `Accelerator(...)` that make a multi-process launch on CPU really use its processes.

    Without a GPU, DDP runs over gloo on the CPU (`cpu=True`, which accelerate otherwise only takes from
    ACCELERATE_USE_CPU=1); DeepSpeed must not be given `cpu=True` but needs the gloo backend named."""
    from accelerate import InitProcessGroupKwargs

    env = os.environ if env is None else env
    launched = int(env.get("WORLD_SIZE", "1"))
    if launched <= 1 or has_accelerator_device():
        return {}
    kwargs: dict = {"kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}
    if not _flag(env, "ACCELERATE_USE_DEEPSPEED") and not _flag(env, "ACCELERATE_USE_FSDP"):
        kwargs["cpu"] = True
    return kwargs


def check_deepspeed_file(env=None) -> None:
    """A DeepSpeed config file named by the launch config must exist (paths are relative to the
    directory the launch runs in)."""
    env = os.environ if env is None else env
    if not _flag(env, "ACCELERATE_USE_DEEPSPEED"):
        return
    path = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if path != "none" and not Path(path).is_file():
        raise ToolkitError(
            f"the launch config names the DeepSpeed file '{path}', which does not exist from '{os.getcwd()}': "
            "launch from the repository root (the shipped configs use paths relative to it) or make "
            "deepspeed_config_file an absolute path"
        )


def check_launch(accelerator, env=None) -> None:
    """Refuse a launch that gave fewer processes, or another engine, than it asked for."""
    from accelerate.utils import DistributedType

    env = os.environ if env is None else env
    launched = int(env.get("WORLD_SIZE", "1"))
    got = accelerator.num_processes
    if launched != got:
        raise ToolkitError(
            f"the launcher started {launched} processes but only {got} joined the run; on CPU launch with {CPU_LAUNCH}"
        )
    # accelerate's simple launcher (`--cpu`, or a MULTI_CPU config on one machine) sets a rendezvous
    # port when asked for several processes, then starts one.
    if "WORLD_SIZE" not in env and "MASTER_PORT" in env and "ACCELERATE_MIXED_PRECISION" in env:
        raise ToolkitError(
            "accelerate launch was asked for several processes but started only one (its --cpu flag and "
            f"MULTI_CPU config files do that on one machine): use {CPU_LAUNCH}, or "
            "accelerate launch --config_file recipes/accelerate/multi-cpu.yaml"
        )
    kind = accelerator.distributed_type
    if _flag(env, "ACCELERATE_USE_FSDP") and kind != DistributedType.FSDP:
        raise ToolkitError(
            f"the launch asked for FSDP but accelerate set up {kind.value} ({got} process(es)): accelerate runs FSDP "
            "only on GPUs and falls back to plain data parallelism on CPU. To shard on CPU use DeepSpeed ZeRO-3 "
            "(recipes/accelerate/deepspeed-zero3.yaml); for plain data parallelism use recipes/accelerate/multi-cpu.yaml"
        )
    if _flag(env, "ACCELERATE_USE_DEEPSPEED") and kind != DistributedType.DEEPSPEED:
        raise ToolkitError(
            f"the launch asked for DeepSpeed but accelerate set up {kind.value}: do not combine DeepSpeed with "
            "--cpu or ACCELERATE_USE_CPU=1 (DeepSpeed runs on CPU by itself when there is no GPU)"
        )


def engine_name(accelerator) -> str:
    """How the model is distributed: single, ddp, fsdp, or deepspeed-zeroN[-offload]. A checkpoint resumes
    only under the same engine."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        zero = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
        offload = any(
            (zero.get(k) or {}).get("device", "none") not in ("none", None)
            for k in ("offload_optimizer", "offload_param")
        )
        return f"deepspeed-zero{zero.get('stage', 0)}" + ("-offload" if offload else "")
    if kind == DistributedType.FSDP:
        return "fsdp"
    if kind == DistributedType.NO:
        return "single"
    return "ddp"


def describe(accelerator) -> str:
    """One line for the log: processes, engine and backend."""
    name = engine_name(accelerator)
    backend = getattr(accelerator.state, "backend", None)
    return f"{accelerator.num_processes} process(es), {name}" + (f" over {backend}" if backend else "")


# --------------------------------------------------------------------------------------------
# DeepSpeed config: "auto" values filled from the recipe, contradictions refused
# --------------------------------------------------------------------------------------------


def deepspeed_config(accelerator) -> dict | None:
    """The live DeepSpeed config dict of this run (None without DeepSpeed)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return accelerator.state.deepspeed_plugin.deepspeed_config


def written_deepspeed_config(env=None) -> dict | None:
    """The DeepSpeed file as the user wrote it (accelerate inserts defaults into its copy)."""
    env = os.environ if env is None else env
    path = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if path == "none" or not Path(path).is_file():
        return None
    return json.loads(Path(path).read_text())


def _get(tree: dict, dotted: str, default=None):
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _set(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(float(a) - float(b)) <= 1e-12 * max(1.0, abs(float(b)))
    return a == b


def recipe_values(t, world: int) -> dict[str, tuple[object, str]]:
    """DeepSpeed key -> (value from the recipe, where it comes from): the file must say "auto" or agree."""
    return {
        "train_micro_batch_size_per_gpu": (t.per_device_train_batch_size, "training.per_device_train_batch_size"),
        "gradient_accumulation_steps": (t.gradient_accumulation_steps, "training.gradient_accumulation_steps"),
        "train_batch_size": (
            t.per_device_train_batch_size * t.gradient_accumulation_steps * world,
            f"training.per_device_train_batch_size x gradient_accumulation_steps x {world} processes",
        ),
        "gradient_clipping": (float(t.max_grad_norm), "training.max_grad_norm"),
        "optimizer.params.lr": (t.learning_rate, "training.learning_rate"),
        "optimizer.params.betas": ([t.adam_beta1, t.adam_beta2], "training.adam_beta1/adam_beta2"),
        "optimizer.params.eps": (t.adam_epsilon, "training.adam_epsilon"),
        "optimizer.params.weight_decay": (t.weight_decay, "training.weight_decay"),
        "fp16.enabled": (t.mixed_precision == "fp16", "training.mixed_precision"),
        "bf16.enabled": (t.mixed_precision == "bf16", "training.mixed_precision"),
    }


def bucket_sizes(hidden_size: int) -> dict[str, int]:
    """Communication bucket sizes from the model's width (the values the Hugging Face integrations use);
    tuning knobs rather than training settings, so a number in the file is kept."""
    return {
        "zero_optimization.reduce_bucket_size": hidden_size * hidden_size,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size,
    }


ALWAYS_SET = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "gradient_clipping")


def fill_deepspeed_config(
    config: dict,
    t,
    world: int,
    hidden_size: int | None = None,
    written: dict | None = None,
    name: str = "the DeepSpeed config",
) -> dict:
    """Fill `config` (in place) from the recipe and return it.

    `written` is the file as the user wrote it (defaults to `config`): each of its training
    settings must be "auto", absent, or equal to the recipe's value. Bucket sizes are filled only
    when `hidden_size` is known (after the model is built)."""
    written = config if written is None else written
    zero = config.get("zero_optimization")
    if not isinstance(zero, dict) or zero.get("stage") not in (1, 2, 3):
        raise ToolkitError(
            f"{name}: zero_optimization.stage must be 1, 2 or 3 (got {_get(config, 'zero_optimization.stage')}); "
            "stage 0 is plain data parallelism: use recipes/accelerate/multi-gpu.yaml or multi-cpu.yaml instead"
        )
    if "scheduler" in written:
        raise ToolkitError(
            f"{name} has a scheduler section: the learning-rate schedule comes from the recipe "
            "(training.lr_scheduler_type, warmup_steps): remove the section"
        )
    _check_deepspeed_optimizer(config, written, t, name)
    for key, value in (bucket_sizes(hidden_size) if hidden_size else {}).items():
        if _get(config, key) == "auto":
            _set(config, key, value)
    for key, (value, source) in recipe_values(t, world).items():
        user = _get(written, key, "auto")
        if user != "auto" and not _same(user, value):
            raise ToolkitError(
                f'{name} sets {key}={user!r} but the recipe gives {value!r} ({source}): set it to "auto" in the '
                "DeepSpeed file (the toolkit fills it from the recipe) or change the recipe to match"
            )
        if key in ALWAYS_SET or _get(config, key) is not None:  # fill only what the file names
            _set(config, key, value)
    if _get(config, "zero_optimization.stage3_gather_16bit_weights_on_model_save") == "auto":
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    left = sorted(_auto_keys(config))
    if left and hidden_size is not None:
        raise ToolkitError(f'{name}: the toolkit cannot fill "auto" for {", ".join(left)}: give numbers there')
    return config


def _auto_keys(tree: dict, prefix: str = ""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _auto_keys(v, f"{prefix}{k}.")
        elif v == "auto":
            yield f"{prefix}{k}"


def _check_deepspeed_optimizer(config: dict, written: dict, t, name: str) -> None:
    ds_opt = written.get("optimizer")
    offload = str(_get(config, "zero_optimization.offload_optimizer.device", "none")).lower() not in ("none", "null")
    if ds_opt is not None:
        kind = str(ds_opt.get("type", "")).lower()
        if kind not in DEEPSPEED_OPTIMIZERS.get(t.optimizer, ()):
            raise ToolkitError(
                f"{name} asks for DeepSpeed's {ds_opt.get('type')} optimizer but the recipe says "
                f"training.optimizer={t.optimizer}: make them the same algorithm, or remove the optimizer section "
                "to train with the recipe's optimizer"
            )
        clip_inside = float(_get(ds_opt, "params.max_grad_norm", 0) or 0)
        if clip_inside > 0 and t.max_grad_norm > 0:
            raise ToolkitError(
                f"{name}: the {ds_opt.get('type')} optimizer clips gradients itself (params.max_grad_norm="
                f"{clip_inside}) and the engine clips too (training.max_grad_norm={t.max_grad_norm}): "
                "set one of them to 0 so gradients are clipped once"
            )
    elif offload and t.optimizer != "adamw" and config.get("zero_force_ds_cpu_optimizer", True):
        raise ToolkitError(
            f"{name} offloads the optimizer, and under ZeRO-Offload accelerate replaces any optimizer by "
            f"DeepSpeed's CPU Adam: training.optimizer={t.optimizer} would silently become Adam. Use "
            'training.optimizer=adamw, or set "zero_force_ds_cpu_optimizer": false in the file'
        )


def hidden_size_of(objective) -> int | None:
    sizes = [
        getattr(m.config, "hidden_size", None) or getattr(m.config, "n_embd", None)
        for m in objective.hf_models().values()
        if hasattr(m, "config")
    ]
    sizes = [s for s in sizes if s]
    return max(sizes) if sizes else None


def honor_zero3_init_flag(accelerator) -> None:
    """With `zero3_init_flag: false` models are built whole and DeepSpeed partitions them when the engine
    starts: the same initial weights as every other launch. accelerate registers its DeepSpeed config with
    transformers whatever the flag says, which makes `from_config`/`from_pretrained` build partitioned
    models (`deepspeed.zero.Init`); unregister it when the flag is off."""
    config = deepspeed_config(accelerator)
    if config is None or accelerator.state.deepspeed_plugin.zero3_init_flag:
        return
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def fill_deepspeed(accelerator, t, objective=None) -> dict | None:
    """Fill the live DeepSpeed config of this run from the recipe (None without DeepSpeed): once when the
    accelerator is made (refusing contradictions before any work), and again before `prepare` with the
    model's hidden size for the bucket sizes."""
    config = deepspeed_config(accelerator)
    if config is None:
        return None
    written = written_deepspeed_config()
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    name = f"the DeepSpeed file {path}" if written is not None else "the DeepSpeed config"
    hidden = hidden_size_of(objective) if objective is not None else None
    return fill_deepspeed_config(config, t, accelerator.num_processes, hidden, written, name)


def prepare_fsdp(objective) -> None:
    """FSDP's transformer-based wrapping reads the layer classes from `_no_split_modules`, which the
    transformers models have and the objective wrapping them does not."""
    names: list[str] = []
    for m in objective.hf_models().values():
        names += [n for n in (getattr(m, "_no_split_modules", None) or []) if n not in names]
    if names and not getattr(objective, "_no_split_modules", None):
        objective._no_split_modules = names


# --------------------------------------------------------------------------------------------
# Saving: the full model from sharded or wrapped parameters
# --------------------------------------------------------------------------------------------


def full_state_dict(accelerator, model) -> dict:
    """The full, unsharded state dict of a prepared model. Every process must call this.

    Under DeepSpeed the trainable weights are taken from the optimizer's fp32 master copy (gathered
    under ZeRO-3), so a bf16 run still saves full-precision weights; frozen ones are gathered from
    the module. Elsewhere accelerate gathers (FSDP) or unwraps (DDP) the model."""
    from accelerate.utils import DistributedType

    from toolkit.engine import parallel

    layout = parallel.layout_of(accelerator)
    if layout.tp > 1:  # tensor-parallel shards gathered into full tensors
        return parallel.full_state_dict(model, layout)
    if layout.pp > 1:  # every pipeline stage's weights
        from toolkit.engine import pipeline

        return pipeline.full_state_dict(model, layout)
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return accelerator.get_state_dict(model)
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    module = accelerator.unwrap_model(model)
    full: dict[int, torch.Tensor] = {}
    for _, p in module.named_parameters():  # tied parameters appear once
        value = safe_get_full_fp32_param(p) if p.requires_grad else None
        if value is None:
            sharded = hasattr(p, "ds_id")
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None) if sharded else nullcontext():
                value = p.detach().clone()
        shape = tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)
        full[id(p)] = (
            value.detach().to("cpu", torch.float32 if value.is_floating_point() else value.dtype).reshape(shape)
        )
    return {
        k: full[id(v)] if id(v) in full else v.detach().cpu().clone()
        for k, v in module.state_dict(keep_vars=True).items()
    }
