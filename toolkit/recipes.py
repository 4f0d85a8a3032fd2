"""Validation of shipped files under `recipes/`: toolkit recipes, accelerate configs, DeepSpeed JSON."""

from __future__ import annotations

import json
from pathlib import Path

from toolkit.config import PretrainRecipe, read_yaml, resolve
from toolkit.errors import ToolkitError

# Which recipe class a YAML file is, by its top-level sections: (section, "module:Class"), imported
# only when a file has that section; pretraining otherwise.
RECIPE_KINDS: list[tuple[str, str]] = [
    ("study", "toolkit.studies:StudyRecipe"),
    ("tasks", "toolkit.benchmarking:Suite"),
    ("compress", "toolkit.compression.config:CompressRecipe"),
    ("finetune", "toolkit.finetuning.config:FinetuneRecipe"),
    ("task", "toolkit.finetuning.config:FinetuneRecipe"),
]


def recipe_class(data: dict):
    import importlib

    for section, target in RECIPE_KINDS:
        if section in data:
            module, name = target.split(":")
            return getattr(importlib.import_module(module), name)
    return PretrainRecipe


def validate_file(path: str | Path) -> None:
    """Parse and validate one shipped file; raises ToolkitError (or ValueError) when it is wrong."""
    path = Path(path)
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        if "zero_optimization" in data:
            validate_deepspeed_config(data, str(path))
        return
    data = read_yaml(path)
    if "compute_environment" in data or "distributed_type" in data:  # an accelerate launch config
        validate_launch_config(path, data)
        return
    resolve(recipe_class(data), data)
    if not path.read_text().lstrip().startswith("#"):
        raise ToolkitError(f"{path}: a shipped recipe starts with a comment giving its launch commands")


def validate_launch_config(path: Path, data: dict) -> None:
    """An accelerate config: parsed by accelerate; a DeepSpeed file it names exists (paths are relative to
    the directory the launch runs in, the repository root for shipped files) and is valid."""
    from accelerate.commands.config.config_args import ClusterConfig

    ClusterConfig.from_yaml_file(str(path))
    name = (data.get("deepspeed_config") or {}).get("deepspeed_config_file")
    if name:
        target = Path(name)
        candidates = [target] if target.is_absolute() else [p / target for p in path.resolve().parents]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise ToolkitError(f"{path}: its deepspeed_config_file '{name}' does not exist")
        validate_deepspeed_config(json.loads(found.read_text()), str(found))
    if not path.read_text().lstrip().startswith("#"):
        raise ToolkitError(f"{path}: a shipped launch config starts with a comment giving its launch command")


def validate_deepspeed_config(data: dict, name: str) -> None:
    """A DeepSpeed JSON file: every "auto" is one the toolkit fills, and DeepSpeed's own schema accepts
    the result (unknown or misspelt keys are errors there)."""
    import copy

    from toolkit.config import TrainingArgs
    from toolkit.engine.distributed import fill_deepspeed_config

    filled = fill_deepspeed_config(copy.deepcopy(data), TrainingArgs(), world=1, hidden_size=768, name=name)
    try:
        from deepspeed.runtime.config import DeepSpeedConfig

        DeepSpeedConfig(filled)
    except ImportError:  # DeepSpeed is optional at run time; its schema check needs it
        return
    except Exception as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and "errors.pydantic.dev" not in ln]
        raise ToolkitError(f"{name}: DeepSpeed rejects the config: {'; '.join(lines)}") from None
