"""`toolkit benchmark MODEL`: one checkpoint fine-tuned on every task of a suite, several seeds, the
way GLUE scores are reported (each task's metric, then the suite mean).

A suite is a YAML file (`Suite`): a list of tasks, each a built-in task name or a mapping of `task.*`
keys (your own files with `text_fields`/`label_field`), plus `recipe`: fine-tuning keys applied to every
run, so every model is benchmarked with the same settings. Every run is an ordinary `toolkit finetune`
run folder, `output_dir/<task>/<mode>/seed-<n>/`; one that already holds results.json is read, not
run again, so a killed benchmark continues where it stopped.

Every recipe is resolved and every task's data read and checked (columns, labels, splits) before the
first run trains. The score of a task is its test macro-F1 (classification: the share of each class
counts, as sms-spam is 87% ham) or Pearson correlation (regression), unless the suite names another
`metric`; the suite score is the mean over tasks, and each figure is the mean and the standard
deviation over seeds.
"""

from __future__ import annotations

import csv
import statistics
from dataclasses import dataclass
from pathlib import Path

from toolkit.config import help_field, merge, resolve
from toolkit.errors import ToolkitError, check_choice

DEFAULT_SUITE = Path(__file__).resolve().parents[1] / "recipes" / "suite-default.yaml"
METRICS = ("accuracy", "macro_f1", "mcc", "pearson", "spearman")
TASK_EXTRAS = ("id", "metric")  # suite-only keys of a task entry; the rest are task.* keys


@dataclass
class Suite:
    """A downstream task suite: `toolkit benchmark MODEL --suite SUITE.yaml`."""

    tasks: list = help_field(
        "Tasks: a built-in name (movie-sentiment, question-type, ...) or a mapping of task.* keys "
        "(train_file, text_fields, label_field, ...) with an optional id (its name in the table) and metric "
        "(accuracy, macro_f1, mcc, pearson, spearman).",
        default_factory=list,
    )
    recipe: dict = help_field(
        "Fine-tuning recipe keys applied to every task and model, e.g. {training: {num_train_epochs: 3}, "
        "task: {max_seq_length: 64}}; not model, output_dir, the task's data or the seed.",
        default_factory=dict,
    )
    seeds: int = help_field("Fine-tuning seeds per task (42, 43, ...).", default=3)
    modes: list = help_field("Fine-tuning modes, e.g. [full] or [frozen, full].", default_factory=lambda: ["full"])

    def validate(self) -> None:
        from toolkit.finetuning.config import MODES

        if not self.tasks:
            raise ToolkitError("the suite has no tasks: list at least one under tasks (e.g. - movie-sentiment)")
        if self.seeds < 1:
            raise ToolkitError(f"the suite's seeds must be at least 1 (got {self.seeds})")
        if not self.modes:
            raise ToolkitError("the suite's modes are empty: give at least one, e.g. [full]")
        for mode in self.modes:
            check_choice("modes", mode, MODES)
        shared = [k for k in ("model", "output_dir", "compare") if k in self.recipe]
        shared += [f"task.{k}" for k in ("name", "train_file", "validation_file", "test_file")]
        shared = [k for k in shared if _has(self.recipe, k)]
        if _has(self.recipe, "training.seed") or _has(self.recipe, "finetune.mode"):
            shared.append("training.seed / finetune.mode")
        if shared:
            raise ToolkitError(
                f"the suite's recipe sets {', '.join(shared)}: the model, the tasks, seeds and modes of a benchmark "
                "come from the command line and the task list, not from the shared recipe"
            )
        ids = [entry_id(t) for t in self.tasks]
        for t in self.tasks:
            if isinstance(t, dict) and t.get("metric") is not None:
                check_choice("metric of a suite task", t["metric"], METRICS)
            elif not isinstance(t, (str, dict)):
                raise ToolkitError(f"a suite task must be a built-in name or a mapping of task keys, got {t!r}")
        if len(set(ids)) != len(ids):
            raise ToolkitError(f"the suite lists a task twice ({ids}): give each its own id")


def _has(tree: dict, dotted: str) -> bool:
    *parents, last = dotted.split(".")
    for p in parents:
        tree = tree.get(p) or {}
    return isinstance(tree, dict) and last in tree


def entry_id(entry) -> str:
    if isinstance(entry, str):
        return entry
    if not isinstance(entry, dict):
        return str(entry)
    if entry.get("id"):
        return str(entry["id"])
    if entry.get("name"):
        return str(entry["name"])
    if entry.get("train_file"):
        return Path(str(entry["train_file"])).stem
    raise ToolkitError(f"suite task {entry} has neither a built-in name nor a train_file: give one of them")


def load_suite(suite=None, seeds: int | None = None, modes: list | None = None) -> Suite:
    """A Suite from a YAML path, a dict or a Suite (default: the shipped default suite), with the
    command line's seeds and modes winning."""
    if suite is None:
        suite = DEFAULT_SUITE
    extra = {k: v for k, v in (("seeds", seeds), ("modes", list(modes) if modes else None)) if v is not None}
    return resolve(Suite, suite, extra)


# ---- the runs ------------------------------------------------------------------------------------


@dataclass
class Run:
    task: str
    mode: str
    seed: int
    metric: str
    recipe: object  # FinetuneRecipe


def plan(model: str, suite: Suite, output_dir: str | Path, overrides: dict | None = None) -> list[Run]:
    """One resolved, validated fine-tuning recipe per task x mode x seed (nothing read yet)."""
    from toolkit.finetuning.config import FinetuneRecipe

    runs = []
    for entry in suite.tasks:
        task_id = entry_id(entry)
        task = {"name": entry} if isinstance(entry, str) else {k: v for k, v in entry.items() if k not in TASK_EXTRAS}
        metric = entry.get("metric") if isinstance(entry, dict) else None
        for mode in suite.modes:
            for i in range(suite.seeds):
                seed = 42 + i
                data = merge(suite.recipe, overrides or {})
                data = merge(
                    data,
                    {
                        "output_dir": str(Path(output_dir) / task_id / mode / f"seed-{seed}"),
                        "model": {"model_name_or_path": str(model)},
                        "task": task,
                        "finetune": {"mode": mode},
                        "training": {"seed": seed},
                    },
                )
                try:
                    recipe = resolve(FinetuneRecipe, data)
                except ToolkitError as e:
                    raise ToolkitError(f"suite task '{task_id}': {e}") from None
                runs.append(Run(task_id, mode, seed, metric, recipe))
    return runs


def check_data(runs: list[Run]) -> dict:
    """Read every task once with the model's tokenizer: a missing column, an unknown label or an empty
    split stops here, before any training. Returns task id -> TaskData (untokenized splits dropped)."""
    from toolkit.finetuning.tasks import load_task
    from toolkit.hf import quiet_datasets
    from toolkit.models import check_model_dir
    from toolkit.paths import resolve_path
    from toolkit.tokenizer import load_model_tokenizer

    first = runs[0].recipe.model
    model_dir = resolve_path(first.model_name_or_path)
    check_model_dir(model_dir)
    tokenizer = load_model_tokenizer(
        model_dir, resolve_path(first.tokenizer_name_or_path) if first.tokenizer_name_or_path else None
    )
    found = {}
    for run in runs:
        if run.task in found:
            continue
        try:
            with quiet_datasets():
                found[run.task] = load_task(run.recipe.task, tokenizer)
        except ToolkitError as e:
            raise ToolkitError(f"suite task '{run.task}': {e}") from None
    return found


def finished_metrics(folder: Path) -> dict | None:
    """The results of a finished run folder, or None (no folder, or one killed part-way)."""
    import json

    path = Path(folder) / "results.json"
    return json.loads(path.read_text()) if path.is_file() else None


def run_one(run: Run) -> dict:
    """Fine-tune one task/mode/seed (or read its finished folder); its results."""
    import dataclasses

    from toolkit.finetuning.pipeline import run as finetune_run

    out = Path(run.recipe.output_dir)
    done = finished_metrics(out)
    if done is not None:
        return done
    recipe = run.recipe
    if out.exists():  # killed part-way: a fine-tuning run is short, start it again
        recipe = dataclasses.replace(recipe, training=dataclasses.replace(recipe.training, overwrite_output_dir=True))
    return finetune_run(recipe).metrics


# ---- the table -----------------------------------------------------------------------------------


@dataclass
class BenchmarkResult:
    model: str
    rows: list[dict]  # one per task x mode x seed: task, mode, seed, metric, score, test_* metrics
    table: list[dict]  # one per task x mode (and "suite mean"): mean, std over seeds
    markdown: Path | None = None
    csv: Path | None = None
    plot: Path | None = None
    text: str = ""
    floor: BenchmarkResult | None = None  # the same architecture from random init (against_random_init)
    versus: list[dict] | None = None  # per task x mode: pretrained, random init, difference
    verdict: str = ""

    def suite_mean(self, mode: str = "full") -> float:
        return next(r["mean"] for r in self.table if r["task"] == SUITE_MEAN and r["mode"] == mode)

    def summary(self) -> str:
        where = f"benchmark written to {self.markdown}, {self.csv}" + (f" and {self.plot}" if self.plot else "")
        if self.versus is not None:
            return f"\n{versus_table(self.versus)}\n\n{self.verdict}\n\n{where}"
        return f"\n{self.text}\n\n{where}"


SUITE_MEAN = "suite mean"


def default_metric(problem_type: str) -> str:
    return "pearson" if problem_type == "regression" else "macro_f1"


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean and spread over seeds of each task and mode, then the suite mean (the mean over tasks of each
    seed's scores: its spread is that of the suite score itself)."""
    out = []
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    for mode in modes:
        per_seed: dict = {}
        for task in tasks:
            mine = [r for r in rows if r["task"] == task and r["mode"] == mode]
            scores = [r["score"] for r in mine]
            out.append(dict(task=task, mode=mode, metric=mine[0]["metric"], **_spread(scores)))
            for r in mine:
                per_seed.setdefault(r["seed"], []).append(r["score"])
        suite = [statistics.fmean(v) for v in per_seed.values() if len(v) == len(tasks)]
        out.append(dict(task=SUITE_MEAN, mode=mode, metric="mean", **_spread(suite)))
    return out


def _spread(scores: list[float]) -> dict:
    return {
        "mean": statistics.fmean(scores),
        "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
        "seeds": len(scores),
    }


def markdown_table(table: list[dict]) -> str:
    modes = list(dict.fromkeys(r["mode"] for r in table))
    tasks = list(dict.fromkeys(r["task"] for r in table))
    cell = {(r["task"], r["mode"]): r for r in table}
    lines = [
        "| task | metric | " + " | ".join(modes) + " |",
        "| --- | --- | " + " | ".join("---:" for _ in modes) + " |",
    ]
    for task in tasks:
        first = cell[(task, modes[0])]
        cells = [f"{cell[(task, m)]['mean']:.3f} ± {cell[(task, m)]['std']:.3f}" for m in modes]
        name = f"**{task}**" if task == SUITE_MEAN else task
        lines.append(f"| {name} | {first['metric']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def against_floor(result: BenchmarkResult, floor: BenchmarkResult) -> tuple[list[dict], str]:
    """Each task's (and the suite mean's) score of the model beside its random-init twin's, and a
    sentence: on how many tasks pretraining helped."""
    theirs = {(r["task"], r["mode"]): r for r in floor.table}
    rows = [
        dict(
            task=r["task"],
            mode=r["mode"],
            metric=r["metric"],
            pretrained=r["mean"],
            random_init=theirs[(r["task"], r["mode"])]["mean"],
            difference=r["mean"] - theirs[(r["task"], r["mode"])]["mean"],
        )
        for r in result.table
    ]
    lines = []
    for mode in dict.fromkeys(r["mode"] for r in rows):
        tasks = [r for r in rows if r["mode"] == mode and r["task"] != SUITE_MEAN]
        won = [r["task"] for r in tasks if r["difference"] > 0]
        lost = [r["task"] for r in tasks if r["difference"] <= 0]
        suite = next(r for r in rows if r["mode"] == mode and r["task"] == SUITE_MEAN)
        lines.append(
            f"{mode}: the checkpoint beats the same architecture from random initialisation on {len(won)} of "
            f"{len(tasks)} tasks (suite mean {100 * suite['difference']:+.1f} points)"
            + (f"; not on {', '.join(lost)}" if lost else "")
            + "."
        )
    return rows, "\n".join(lines)


def versus_table(rows: list[dict]) -> str:
    lines = [
        "| task | mode | metric | pretrained | random init | difference |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        name = f"**{r['task']}**" if r["task"] == SUITE_MEAN else r["task"]
        lines.append(
            f"| {name} | {r['mode']} | {r['metric']} | {r['pretrained']:.3f} | {r['random_init']:.3f} | "
            f"{r['difference']:+.3f} |"
        )
    return "\n".join(lines)


def write_outputs(result: BenchmarkResult, out: Path, header: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result.markdown, result.csv = out / "benchmark.md", out / "benchmark.csv"
    result.markdown.write_text(header + result.text + "\n")
    keys = list(dict.fromkeys(k for r in result.rows for k in r))
    with result.csv.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(result.rows)
    result.plot = plot(result.table, out / "benchmark.png")


def plot(table: list[dict], path: Path) -> Path:
    """One bar per task (and the suite mean) and mode, with the spread over seeds as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r["mode"] for r in table))
    tasks = list(dict.fromkeys(r["task"] for r in table))
    cell = {(r["task"], r["mode"]): r for r in table}
    width = 0.8 / len(modes)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(tasks)), 4.5))
    for i, mode in enumerate(modes):
        xs = [j + (i - (len(modes) - 1) / 2) * width for j in range(len(tasks))]
        ax.bar(
            xs,
            [cell[(t, mode)]["mean"] for t in tasks],
            width,
            yerr=[cell[(t, mode)]["std"] for t in tasks],
            capsize=3,
            label=mode,
        )
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_ylabel("test score (macro-F1 / Pearson)")
    ax.set_title("Downstream suite: mean and spread over seeds")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---- the public function -------------------------------------------------------------------------


def benchmark(
    model,
    suite=None,
    seeds: int | None = None,
    modes: list | None = None,
    output_dir: str | Path | None = None,
    overrides: list | dict | None = None,
    against_random_init: bool = False,
) -> BenchmarkResult:
    """Fine-tune `model` (a checkpoint folder) on every task of `suite` (a YAML path, dict or Suite;
    default: recipes/suite-default.yaml) with `seeds` seeds in each of `modes`, and write benchmark.md,
    .csv and .png into `output_dir` (default: outputs/benchmark/<model folder name>). `overrides` are
    fine-tuning recipe keys applied to every run, on top of the suite's `recipe`.

    `against_random_init`: also benchmark the same architecture, config and tokenizer with fresh
    weights (`output_dir/random-init/`, same suite, seeds and settings) and write both side by side
    (`vs-random-init.md`): whether pretraining paid off, task by task."""
    import os

    from toolkit.config import combine_overrides

    s = load_suite(suite, seeds, modes)
    out = Path(output_dir) if output_dir is not None else Path("outputs") / "benchmark" / Path(str(model)).name
    runs = plan(str(model), s, out, combine_overrides(overrides))
    data = check_data(runs)  # every task's data checked before the first run trains
    main = os.environ.get("RANK", "0") == "0"

    rows = []
    for i, run in enumerate(runs):
        if main:
            print(f"\n==== benchmark: {run.task}, {run.mode}, seed {run.seed} ({i + 1} of {len(runs)})")
        metrics = run_one(run)
        task = data[run.task]
        metric = run.metric or default_metric(task.problem_type)
        if f"test_{metric}" not in metrics:
            raise ToolkitError(
                f"suite task '{run.task}' has no test_{metric} (its test split is empty or the metric does not fit "
                "its problem type): keep task.test_split > 0, or choose another metric"
            )
        rows.append(
            dict(
                task=run.task,
                mode=run.mode,
                seed=run.seed,
                metric=metric,
                score=metrics[f"test_{metric}"],
                **{k: v for k, v in metrics.items() if k.startswith("test_") and isinstance(v, (int, float))},
                train_rows=task.rows.get("train"),
                test_rows=task.rows.get("test"),
                train_seconds=metrics.get("train_seconds"),
            )
        )
    table = aggregate(rows)
    result = BenchmarkResult(model=str(model), rows=rows, table=table, text=markdown_table(table))
    if main:
        header = (
            f"# Benchmark of `{model}`\n\n{len(s.tasks)} tasks, modes {', '.join(s.modes)}, {s.seeds} seed(s) each; "
            "test scores, mean ± standard deviation over seeds (classification: macro-F1, regression: Pearson, "
            "unless the suite names a metric).\n\n"
        )
        write_outputs(result, out, header)
    if against_random_init:
        from toolkit.models import random_twin
        from toolkit.paths import resolve_path

        floor_dir = out / "random-init"
        twin = random_twin(resolve_path(str(model)), floor_dir / "model", seed=0)
        result.floor = benchmark(twin, s, output_dir=floor_dir, overrides=overrides)
        result.versus, result.verdict = against_floor(result, result.floor)
        if main:
            (out / "vs-random-init.md").write_text(
                f"# `{model}` against the same architecture from random initialisation\n\n"
                f"Same suite, seeds and settings; test scores, mean over {s.seeds} seed(s).\n\n"
                f"{versus_table(result.versus)}\n\n{result.verdict}\n"
            )
    return result
