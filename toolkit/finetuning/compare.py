"""`toolkit compare`: several fine-tuning modes on the same task, checkpoint and seed, side by side.

Each mode is an ordinary `toolkit finetune` run into `output_dir/<mode>/` (its own model or adapter,
metrics and card); the comparison adds `comparison.md` and `comparison.csv` (test metrics, trainable
parameters and their share, training time per epoch, total time, peak memory, size of the saved
weights) and `comparison.png` (validation metric against training time) to `output_dir`.

Every mode's recipe is built and validated, and the data checked, before the first mode trains.
"""

from __future__ import annotations

import csv
import gc
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from toolkit.config import merge, normalize_overrides, recipe_data, resolve
from toolkit.finetuning.config import FinetuneRecipe
from toolkit.finetuning.pipeline import FinetuneResult


@dataclass
class CompareResult:
    table: str  # the Markdown table (also in `markdown`)
    rows: list[dict]
    markdown: Path
    csv: Path
    plot: Path | None
    results: dict[str, FinetuneResult] = field(default_factory=dict)

    def summary(self) -> str:
        where = f"comparison written to {self.markdown}, {self.csv}" + (f" and {self.plot}" if self.plot else "")
        return f"\n{self.table}\n\n{where}"


def mode_recipes(recipe=None, overrides=None, **kwargs) -> tuple[FinetuneRecipe, dict[str, FinetuneRecipe]]:
    """The shared recipe and one validated recipe per row (output_dir/<row>, its overrides applied). A row
    is a mode, or a name of compare.variants (its mode and overrides; compare.mode_overrides of that
    name come on top). Each row derives its own defaults (its mode's learning rate), also from an
    already-resolved recipe."""
    shared = resolve(FinetuneRecipe, recipe, overrides, **kwargs)
    data = recipe_data(shared)
    per_mode = {}
    for name in shared.compare.modes:
        variant = normalize_overrides(shared.compare.variants.get(name, {}))
        mode = variant.get("finetune", {}).get("mode", name)
        row_data = merge(data, {"finetune": {"mode": mode}, "output_dir": str(Path(shared.output_dir) / name)})
        extra = merge(variant, normalize_overrides(shared.compare.mode_overrides.get(name, {})))
        per_mode[name] = resolve(FinetuneRecipe, row_data, extra)
    return shared, per_mode


def seeded(row_recipe: FinetuneRecipe, seed: int) -> FinetuneRecipe:
    """A row's recipe at another training.seed, into output_dir/<row>/seed-<seed>."""
    at = {"training": {"seed": seed}, "output_dir": str(Path(row_recipe.output_dir) / f"seed-{seed}")}
    return resolve(FinetuneRecipe, recipe_data(row_recipe), at)


def describe_modes(recipe=None, overrides=None) -> str:
    """Every mode's resolved recipe, as `toolkit compare --dry-run` prints them."""
    from toolkit.config import to_yaml

    return "".join(f"# ---- mode {mode}\n{to_yaml(r)}" for mode, r in mode_recipes(recipe, overrides)[1].items())


def compare(recipe=None, overrides=None, **kwargs) -> CompareResult:
    """Run `compare.modes` one after another and write the comparison (table, CSV, plot)."""
    import os

    from toolkit.finetuning.pipeline import run
    from toolkit.finetuning.types import load_any
    from toolkit.hf import quiet_datasets
    from toolkit.models import check_model_dir
    from toolkit.paths import resolve_path
    from toolkit.tokenizer import load_model_tokenizer

    shared, per_mode = mode_recipes(recipe, overrides, **kwargs)
    out = Path(shared.output_dir)
    # The data is the same for every mode: check it once, before anything trains.
    model_dir = resolve_path(shared.model.model_name_or_path)
    check_model_dir(model_dir)
    tokenizer_dir = resolve_path(shared.model.tokenizer_name_or_path) if shared.model.tokenizer_name_or_path else None
    with quiet_datasets():
        _, _, data = load_any(shared.task, load_model_tokenizer(model_dir, tokenizer_dir))
    main = os.environ.get("RANK", "0") == "0"
    _import_before_measuring()

    seeds = shared.compare.seeds
    results, rows, plotted = {}, [], {}
    for number, (mode, mode_recipe) in enumerate(per_mode.items(), 1):
        runs = []
        for seed in seeds or [None]:
            one = mode_recipe if seed is None else seeded(mode_recipe, seed)
            if main:
                at = "" if seed is None else f", seed {seed}"
                print(f"\n==== compare: {mode}{at} ({number} of {len(per_mode)}) -> {one.output_dir}")
            with PeakMemory() as memory:
                result = run(one)
            runs.append(summarise(mode, one, result, memory.peak_mib, data.problem_type))
            results.setdefault(mode, result)  # the first seed's run: its curve is the one plotted
            plotted.setdefault(mode, one)
        rows.append(spread(runs) if seeds else runs[0])

    table = markdown_table(rows, data.problem_type)
    md, csv_path, png = out / "comparison.md", out / "comparison.csv", out / "comparison.png"
    if main:
        out.mkdir(parents=True, exist_ok=True)
        header = (
            f"# Fine-tuning modes compared\n\nCheckpoint `{shared.model.model_name_or_path}`, {data.source}; "
            f"rows: {', '.join(f'{k} {v}' for k, v in data.rows.items())}; "
            + (
                f"few-shot: {shared.task.shots} training and {shared.task.shots} validation examples per class "
                "drawn from those by each run's seed; "
                if shared.task.shots
                else ""
            )
            + (f"seeds {seeds} (mean and standard deviation).\n\n" if seeds else f"seed {shared.training.seed}.\n\n")
        )
        md.write_text(header + table + "\n\n" + NOTES + "\n")
        with csv_path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        png = plot_curves(plotted, results, png, data.problem_type)
    return CompareResult(table=table, rows=rows, markdown=md, csv=csv_path, plot=png, results=results)


NOTES = (
    "Train s/epoch counts optimizer steps only (no evaluation, no checkpoints); total s is the whole run of the "
    "mode, the frozen mode's one-off feature encoding included. Peak memory is the largest resident memory of "
    "the process above its level when the mode started (GPU: peak allocated memory). Weights is the size of "
    "the saved model or adapter files."
)


def summarise(mode: str, recipe, result: FinetuneResult, peak_mib: float, problem_type: str) -> dict:
    m = result.metrics
    row = {"mode": mode}
    if problem_type in TYPE_COLUMNS:  # token classification, question answering, generation
        row.update({k: m.get(k) for k in TYPE_COLUMNS[problem_type]})
    elif problem_type == "regression":
        row.update(test_pearson=m.get("test_pearson"), test_spearman=m.get("test_spearman"))
    else:
        row.update(
            test_accuracy=m.get("test_accuracy"), test_macro_f1=m.get("test_macro_f1"), test_mcc=m.get("test_mcc")
        )
    row.update(
        trainable_params=m.get("trainable_params"),
        trainable_percent=100 * m.get("trainable_share", 0.0),
        epochs=m.get("epochs"),
        learning_rate=recipe.training.learning_rate,
        train_seconds_per_epoch=m.get("train_seconds_per_epoch"),
        total_seconds=m.get("total_seconds"),
        peak_memory_mib=peak_mib,
        weights_mb=(m.get("output_bytes") or 0) / 1e6,
    )
    return row


TEST_METRICS = ("test_accuracy", "test_macro_f1", "test_mcc", "test_pearson", "test_spearman")


def spread(runs: list[dict]) -> dict:
    """One row from a row's runs over several seeds: the mean of every number, and the sample standard
    deviation of the test metrics beside them (`<metric>_sd`)."""
    import statistics

    row = {"mode": runs[0]["mode"], "seeds": len(runs)}
    for key in runs[0]:
        if key == "mode":
            continue
        values = [r[key] for r in runs if r[key] is not None]
        row[key] = statistics.fmean(values) if values else None
        if key in TEST_METRICS:
            row[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else None
    return row


TYPE_COLUMNS = {
    "token_classification": ("test_f1", "test_token_accuracy"),
    "question_answering": ("test_exact_match", "test_f1"),
    "generation": ("test_perplexity", "test_rougeL", "test_f1"),
}


COLUMNS = {  # key: (header, format)
    "test_f1": ("test F1", "{:.3f}"),
    "test_token_accuracy": ("test token accuracy", "{:.3f}"),
    "test_exact_match": ("test exact match", "{:.2f}"),
    "test_perplexity": ("test perplexity", "{:.2f}"),
    "test_rougeL": ("test ROUGE-L", "{:.2f}"),
    "mode": ("mode", "{}"),
    "seeds": ("seeds", "{}"),
    **{f"{k}_sd": (f"{k.removeprefix('test_').replace('_', '-')} sd", "{:.3f}") for k in TEST_METRICS},
    "test_accuracy": ("test accuracy", "{:.3f}"),
    "test_macro_f1": ("test macro-F1", "{:.3f}"),
    "test_mcc": ("test MCC", "{:.3f}"),
    "test_pearson": ("test Pearson", "{:.3f}"),
    "test_spearman": ("test Spearman", "{:.3f}"),
    "trainable_params": ("trainable params", "{:,}"),
    "trainable_percent": ("trainable %", "{:.2f}"),
    "epochs": ("epochs", "{:g}"),
    "learning_rate": ("learning rate", "{:g}"),
    "train_seconds_per_epoch": ("train s/epoch", "{:.1f}"),
    "total_seconds": ("total s", "{:.0f}"),
    "peak_memory_mib": ("peak memory MiB", "{:.0f}"),
    "weights_mb": ("weights MB", "{:.2f}"),
}


def markdown_table(rows: list[dict], problem_type: str) -> str:
    keys = list(rows[0])
    lines = [
        "| " + " | ".join(COLUMNS[k][0] for k in keys) + " |",
        "| " + " | ".join("---" if k == "mode" else "---:" for k in keys) + " |",
    ]
    for row in rows:
        cells = [COLUMNS[k][1].format(row[k]) if row[k] is not None else "-" for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(per_mode: dict, results: dict, path: Path, problem_type: str) -> Path | None:
    """Validation metric against training seconds, one line per mode (the frozen mode's line starts
    after its feature encoding)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from toolkit.engine.tracking import read_metrics
    from toolkit.finetuning.metrics import main_metric

    key = f"eval_{main_metric(problem_type)}"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = False
    for mode, recipe in per_mode.items():
        offset = results[mode].metrics.get("feature_seconds") or 0.0
        points = [(m.get("train_seconds", 0.0) + offset, m[key]) for m in read_metrics(recipe.output_dir) if key in m]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", label=mode)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("training time (s)" + (" (frozen: feature encoding included)" if "frozen" in per_mode else ""))
    ax.set_ylabel(f"validation {main_metric(problem_type)}")
    ax.set_title("Fine-tuning modes: validation metric against training time")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _import_before_measuring() -> None:
    """Load the libraries every mode uses, so the first mode's peak memory does not include them."""
    import accelerate  # noqa: F401
    import peft  # noqa: F401
    import transformers

    from toolkit.engine import loop  # noqa: F401
    from toolkit.finetuning import features, metrics, objective  # noqa: F401

    transformers.AutoModelForSequenceClassification  # noqa: B018  (resolves the lazy module)


class PeakMemory:
    """Peak memory of this process while a block runs, above its level at the start: resident set size
    sampled every 20 ms on CPU, peak allocated memory on a CUDA device."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak_mib = interval, 0.0

    def __enter__(self):
        import torch

        gc.collect()
        _trim_heap()
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        import psutil

        self.process = psutil.Process()
        self.start = self.process.memory_info().rss
        self.peak = self.start
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.done.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            self.peak_mib = (torch.cuda.max_memory_allocated() - self.start) / 2**20
        else:
            self.done.set()
            self.thread.join()
            self.peak_mib = (max(self.peak, self.process.memory_info().rss) - self.start) / 2**20
        gc.collect()
        _trim_heap()
        return False


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc), so the next mode starts from a clean baseline."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
