"""`toolkit compress`, end to end: recipe -> the method -> compressed model(s) -> report.

    quantize  each of compress.schemes, applied as the model loads, saved, reloaded and measured (quantize.py)
    prune     unstructured (global magnitude) or structured (heads and FFN neurons), optionally followed by
              recovery fine-tuning on the run harness (pruned weights stay zero), made permanent, saved (prune.py)
    distill   a student trained on a teacher's soft targets on the run harness (and, for comparison, the same
              student trained without a teacher on the same data and budget) (distill.py)

Every row of the report (the original model first) is measured the same way (`subject.py`, `measure.py`).
Outputs: `output_dir/<model>/` (an ordinary Hugging Face folder per compressed model, with its tokenizer and,
for trained ones, recipe.yaml and checkpoints), `report.md`, `report.csv`, `report.png`, `results.json` and the
resolved `recipe.yaml`. The input model is never modified: its full-precision weights stay the canonical ones.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from toolkit.compression.config import CompressRecipe
from toolkit.compression.measure import Row
from toolkit.config import resolve, to_yaml
from toolkit.errors import ToolkitError

RESULTS_FILE = "results.json"


@dataclass
class CompressResult:
    output_dir: Path
    rows: list[Row]
    table: str
    markdown: Path
    csv: Path
    plot: Path | None
    models: dict = field(default_factory=dict)  # row name -> the model in memory

    def summary(self) -> str:
        if not self.table:
            return ""
        where = f"report written to {self.markdown}, {self.csv}" + (f" and {self.plot}" if self.plot else "")
        return f"\n{self.table}\n\n{where}"


def compress(recipe=None, overrides: list[str] | dict | None = None, **kwargs) -> CompressResult:
    """Compress a model from a recipe (YAML path, dict or CompressRecipe) with optional overrides, e.g.
    `compress("recipes/compress-prune.yaml", compress__sparsity=0.7)`."""
    return run(resolve(CompressRecipe, recipe, overrides, **kwargs))


def method_module(name: str):
    """The module of a compression method: each exposes `run(recipe, out) -> (title, conditions, rows, models)`."""
    import importlib

    return importlib.import_module(f"toolkit.compression.{name}")


def run(recipe: CompressRecipe) -> CompressResult:
    from toolkit.compression.subject import is_main

    out = Path(recipe.output_dir)
    check_output_dir(out, recipe.training)
    c = recipe.compress
    if c.method == "quantize":
        from toolkit.compression.quantize import check_scheme

        for scheme in c.schemes:  # a library or hardware that cannot stops the run here
            check_scheme(scheme)
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
    title, conditions, rows, models = method_module(c.method).run(recipe, out)
    if not is_main():  # the report is the main process's
        return CompressResult(out, rows, "", out / "report.md", out / "report.csv", None, models)
    from toolkit.compression import report

    out.mkdir(parents=True, exist_ok=True)
    table, md, csv_path, png = report.write(out, title, conditions, rows)
    (out / "recipe.yaml").write_text(to_yaml(recipe))
    results = {"method": c.method, "conditions": conditions, "rows": [report.flat(r, rows[0]) for r in rows]}
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")
    return CompressResult(out, rows, table, md, csv_path, png, models)


def check_output_dir(out: Path, t) -> None:
    """A new run must not silently mix with an old one in the same folder."""
    if not out.exists() or not any(out.iterdir()) or t.overwrite_output_dir or t.resume_from_checkpoint:
        return
    raise ToolkitError(
        f"output_dir '{out}' is not empty: start over with training.overwrite_output_dir=true, or choose another "
        "output_dir"
    )
