"""Validation of shipped files under `recipes/`: toolkit recipes, accelerate configs, DeepSpeed JSON."""

from __future__ import annotations

import json
from pathlib import Path

from toolkit.config import PretrainRecipe, load_recipe, read_yaml
from toolkit.errors import ToolkitError

# Which recipe class a YAML file is, by its top-level sections.
RECIPE_KINDS: list[tuple[str, type]] = []  # (section that identifies it, recipe class); pretraining otherwise


def recipe_class(data: dict):
    for section, cls in RECIPE_KINDS:
        if section in data:
            return cls
    return PretrainRecipe


def validate_file(path: str | Path) -> None:
    """Parse and validate one shipped file; raises ToolkitError (or ValueError) when it is wrong."""
    path = Path(path)
    if path.suffix == ".json":
        json.loads(path.read_text())
        return
    data = read_yaml(path)
    if "compute_environment" in data or "distributed_type" in data:  # an accelerate launch config
        from accelerate.commands.config.config_args import ClusterConfig

        ClusterConfig.from_yaml_file(str(path))
        return
    load_recipe(recipe_class(data), data)
    if not path.read_text().lstrip().startswith("#"):
        raise ToolkitError(f"{path}: a shipped recipe starts with a comment giving its launch commands")
