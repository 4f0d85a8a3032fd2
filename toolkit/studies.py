"""`toolkit study RECIPE`: which pretraining objective pays off downstream, at equal compute.

For each objective in `study.objectives` (random init, mlm, mlm+nsp, rtd, clm by default) and each
fraction of `study.budgets`, one ordinary pretraining run trains to `training.max_flops = fraction x
study.max_flops` model FLOPs on the same corpus, tokenizer and model size (BERT for mlm and mlm+nsp, the
ELECTRA discriminator of that size for rtd with the generator at objective.generator_hidden_fraction,
the GPT-2 of that size for clm). Each budget is its own run with its own schedule, decayed to the end
of its budget: a snapshot of a longer run would be a model mid-schedule, not one trained for that much
compute. Random init is one model folder of the BERT architecture, untrained: the floor. Every
checkpoint then runs the downstream suite (`toolkit benchmark`), and `study.md`, `study.csv` and
`study.png` compare them.

The pretraining corpus is task-adaptive (Gururangan et al. 2020): the suite tasks' TRAINING texts
without labels, plus the unlabelled files of `study.unlabelled`. No validation or test text of any
suite task may reach it: such texts are removed (a training text equal to a held-out one included),
and `build_corpus` asserts it before writing the corpus.

Resuming: a pretraining run whose folder holds results.json is done; one with a complete checkpoint
resumes from it; a finished part's suite scores sit in `parts/<part>.json`. Re-running a killed study
redoes nothing that finished.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from toolkit.config import (
    RECIPE_CLASSES,
    DataArgs,
    ModelArgs,
    ObjectiveArgs,
    PretrainRecipe,
    TokenizerArgs,
    TrainingArgs,
    help_field,
    merge,
    resolve,
    to_dict,
)
from toolkit.errors import ToolkitError, check_choice

RANDOM = "random"
ARCHITECTURE = {"mlm": "bert", "mlm+nsp": "bert", "nsp": "bert", "rtd": "electra", "clm": "gpt2", RANDOM: "bert"}
CONTINUE = "continue from "  # a row "continue from CHECKPOINT": masked-LM pretraining of that checkpoint


def continued_from(objective: str) -> str | None:
    """The checkpoint of a "continue from CHECKPOINT" row; None for the objectives trained from scratch."""
    return objective[len(CONTINUE) :].strip() if objective.startswith(CONTINUE) else None


def slug(objective: str) -> str:
    """A folder name for an objective ("continue from pkg://a/b" -> "continue-pkg-a-b")."""
    import re

    return re.sub(r"[^A-Za-z0-9+]+", "-", objective).strip("-")


@dataclass
class StudyArgs:
    """`toolkit study`: the objectives compared, the compute budget and the suite."""

    objectives: list = help_field(
        "Objectives to compare: random (the same BERT, untrained: the floor), mlm, mlm+nsp, rtd, clm, and "
        "'continue from CHECKPOINT' (masked-LM pretraining of an existing checkpoint, with its own tokenizer, "
        "to the same budgets: domain-adaptive pretraining against pretraining from scratch).",
        default_factory=lambda: [RANDOM, "mlm", "mlm+nsp", "rtd", "clm"],
    )
    max_flops: float = help_field(
        "The full pretraining budget in model FLOPs, the same for every objective.", default=1e15
    )
    budgets: list = help_field(
        "Fractions of max_flops at which each objective is pretrained (each its own run) and benchmarked.",
        default_factory=lambda: [0.25, 0.5, 1.0],
    )
    suite: str | None = help_field(
        "Suite YAML of the downstream tasks; unset: recipes/suite-default.yaml.", default=None
    )
    suite_overrides: dict = help_field(
        "Suite keys that replace the suite's, e.g. {seeds: 1, modes: [full]}.", default_factory=dict
    )
    unlabelled: list = help_field(
        "Extra unlabelled text for pretraining: mappings {file, text_fields, max_rows}; each row becomes one "
        "document with a line per field (a film's statement and reply).",
        default_factory=list,
    )
    document_lines: int = help_field(
        "Suite training texts per pretraining document (consecutive texts of one task).", default=8
    )
    gpt2_config_overrides: dict = help_field(
        "config_overrides of the clm (GPT-2) runs; model.config_overrides applies to BERT and ELECTRA.",
        default_factory=dict,
    )


@dataclass
class StudyRecipe:
    """A study: `toolkit study RECIPE [key=value ...]`. The pretraining sections are shared by every
    objective's run (data.train_files is the corpus the study builds)."""

    output_dir: str = help_field("Where the corpus, the runs and study.md/.csv/.png go.", default="outputs/study")
    model: ModelArgs = field(default_factory=ModelArgs)
    tokenizer: TokenizerArgs = field(default_factory=TokenizerArgs)
    data: DataArgs = field(default_factory=DataArgs)
    objective: ObjectiveArgs = field(default_factory=ObjectiveArgs)
    training: TrainingArgs = field(default_factory=TrainingArgs)
    study: StudyArgs = field(default_factory=StudyArgs)

    def validate(self) -> None:
        s = self.study
        if not s.objectives:
            raise ToolkitError("study.objectives is empty: list at least one, e.g. [random, mlm, rtd]")
        for name in s.objectives:
            if continued_from(name) is None:
                check_choice("study.objectives", name, ARCHITECTURE)
            elif not continued_from(name):
                raise ToolkitError("a study.objectives row 'continue from' names no checkpoint: add its folder")
        if len(set(s.objectives)) != len(s.objectives):
            raise ToolkitError(f"study.objectives lists an objective twice: {s.objectives}")
        if s.max_flops <= 0:
            raise ToolkitError(f"study.max_flops must be positive (got {s.max_flops}), e.g. 1e15")
        if not s.budgets or not all(isinstance(b, (int, float)) and 0 < b <= 1 for b in s.budgets):
            raise ToolkitError(f"study.budgets must be fractions in (0, 1], e.g. [0.25, 0.5, 1.0] (got {s.budgets})")
        if self.data.train_files:
            raise ToolkitError(
                "data.train_files is set, but a study builds its own corpus (the suite's training texts and "
                "study.unlabelled): move extra text to study.unlabelled"
            )
        if self.training.max_steps > 0 or self.training.max_flops is not None:
            raise ToolkitError(
                "a study sets each run's length from study.max_flops: remove training.max_steps/max_flops"
            )
        if self.model.model_name_or_path:
            raise ToolkitError("a study pretrains from scratch: remove model.model_name_or_path")
        for u in s.unlabelled:
            if not isinstance(u, dict) or "file" not in u:
                raise ToolkitError(f"each study.unlabelled entry is a mapping with a file (and text_fields), got {u!r}")
        for name in s.objectives:
            if name != RANDOM:
                pretrain_recipe(self, name, 1.0, Path("corpus.txt"))  # each run's recipe validates


RECIPE_CLASSES.append(StudyRecipe)


def pretrain_recipe(recipe: StudyRecipe, objective: str, fraction: float, corpus: Path, tokenizer=None):
    """The ordinary pretraining recipe of one objective at one budget fraction."""
    data = {k: v for k, v in to_dict(recipe).items() if k not in ("study", "output_dir")}
    checkpoint = continued_from(objective)
    common = {
        "output_dir": str(Path(recipe.output_dir) / "pretrain" / slug(objective) / f"budget-{fraction:g}"),
        "data": {"train_files": [str(corpus)], "document_boundary": "blank_line"},
        "training": {"max_flops": fraction * recipe.study.max_flops, "max_steps": -1},
    }
    if checkpoint is not None:
        # the checkpoint as it is (its size, config and own tokenizer, extended by tokenizer.extend_vocab),
        # given the same FLOPs budget of masked-LM pretraining as the models trained from scratch
        data = merge(data, {**common, "model": {"model_name_or_path": checkpoint}, "objective": {"name": "mlm"}})
        data["model"]["config_overrides"] = {}
        data["tokenizer"] = {**data["tokenizer"], "path": None}
        return resolve(PretrainRecipe, data)
    arch = ARCHITECTURE[objective]
    overrides = recipe.study.gpt2_config_overrides if arch == "gpt2" else recipe.model.config_overrides
    data = merge(data, {**common, "model": {"architecture": arch}, "objective": {"name": objective}})
    data["model"]["config_overrides"] = dict(overrides)  # replaced, not merged: the keys differ by architecture
    data["tokenizer"] = {**data["tokenizer"], "extend_vocab": 0}  # extends checkpoints' vocabularies only
    if tokenizer is not None:
        data["tokenizer"] = {**data["tokenizer"], "path": str(tokenizer)}
    return resolve(PretrainRecipe, data)


# ---- the corpus ------------------------------------------------------------------------------------


def suite_runs(recipe: StudyRecipe, model: str = "<model>"):
    from toolkit.benchmarking import load_suite, plan

    suite = load_suite(recipe.study.suite)
    suite = load_suite(merge(to_dict(suite), recipe.study.suite_overrides))
    return suite, plan(model, suite, Path(recipe.output_dir) / "benchmark")


def build_corpus(recipe: StudyRecipe, path: Path) -> dict:
    """Write the pretraining corpus: every suite task's training texts (all of them, ignoring
    max_train_samples) in documents of study.document_lines, then the unlabelled files; texts that
    appear in any task's validation or test split are left out. Returns counts."""
    from toolkit.finetuning.tasks import load_task, read_table
    from toolkit.hf import quiet_datasets

    _, runs = suite_runs(recipe)
    tasks = {r.task: r.recipe.task for r in runs}
    train_texts, held_out = {}, set()
    with quiet_datasets():
        for name, task in tasks.items():
            data = load_task(dataclasses.replace(task, max_train_samples=None))
            train_texts[name] = [_line(row[c]) for row in data.train for c in data.text_fields]
            for split in (data.validation, data.test):
                if split is not None:
                    held_out.update(_line(row[c]) for row in split for c in data.text_fields)
        documents, dropped = [], 0
        for texts in train_texts.values():
            kept = [t for t in texts if t and t not in held_out]
            dropped += len(texts) - len(kept)
            n = recipe.study.document_lines
            documents += [kept[i : i + n] for i in range(0, len(kept), n)]
        for u in recipe.study.unlabelled:
            table = read_table(u["file"], u.get("file_format"), "study.unlabelled")
            fields = u.get("text_fields") or ["text"]
            missing = [c for c in fields if c not in table.column_names]
            if missing:
                raise ToolkitError(
                    f"study.unlabelled: '{u['file']}' has no column {missing[0]!r}; its columns are "
                    f"{', '.join(table.column_names)}"
                )
            rows = table.select(range(min(len(table), u.get("max_rows") or len(table))))
            for row in rows:
                lines = [_line(row[c]) for c in fields if row[c] is not None]
                lines = [t for t in lines if t and t not in held_out]
                if lines:
                    documents.append(lines)
    # the rule of the study, checked on what is written: no held-out text of any suite task
    leaked = {t for doc in documents for t in doc} & held_out
    assert not leaked, f"held-out suite text in the pretraining corpus: {sorted(leaked)[:3]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n\n".join("\n".join(doc) for doc in documents) + "\n", encoding="utf-8")
    tmp.replace(path)
    return {"documents": len(documents), "held_out_texts": len(held_out), "dropped_train_texts": dropped}


def _line(text) -> str:
    return " ".join(str(text).split())  # one line: documents are blank-line separated, sentences by line


# ---- the parts -------------------------------------------------------------------------------------


def train_tokenizer_once(recipe: StudyRecipe, corpus: Path, out: Path) -> Path:
    """One WordPiece tokenizer for every objective (GPT-2 included), trained on the corpus once."""
    if (out / "tokenizer_config.json").is_file():
        return out
    if recipe.tokenizer.path:
        return Path(recipe.tokenizer.path)
    from toolkit.data import corpus as corpus_io
    from toolkit.tokenizer import train_tokenizer

    tk = recipe.tokenizer
    docs = corpus_io.load_documents([corpus], "text", "blank_line")
    tok = train_tokenizer(
        docs["text"], tk.kind or "wordpiece", tk.vocab_size, tk.lowercase, tk.min_frequency, recipe.data.max_seq_length
    )
    tmp = out.with_name(out.name + ".tmp")
    tok.save_pretrained(str(tmp))
    tmp.replace(out)
    return out


def random_init(recipe: StudyRecipe, tokenizer_dir: Path) -> Path:
    """The floor: the BERT of the study's size with its initial weights, saved as a checkpoint."""
    import torch
    import transformers

    from toolkit.models import build_config
    from toolkit.tokenizer import load_tokenizer

    out = Path(recipe.output_dir) / "pretrain" / RANDOM
    if (out / "results.json").is_file():
        return out
    tokenizer = load_tokenizer(tokenizer_dir)
    m = recipe.model
    config = build_config("bert", m.size, tokenizer, recipe.data.max_seq_length, m.config_overrides)
    torch.manual_seed(recipe.training.seed)
    model = transformers.AutoModelForMaskedLM.from_config(config)
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    (tmp / "results.json").write_text(json.dumps({"train_flops": 0.0, "steps": 0}) + "\n")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.replace(out)
    return out


def pretrain_part(recipe: StudyRecipe, objective: str, fraction: float, corpus: Path, tokenizer: Path) -> Path:
    """Pretrain one objective to one budget, or find it done; resume a killed run from its checkpoint."""
    from toolkit.engine.checkpoint import complete_checkpoints
    from toolkit.pretraining import run

    r = pretrain_recipe(recipe, objective, fraction, corpus, None if continued_from(objective) else tokenizer)
    out = Path(r.output_dir)
    if (out / "results.json").is_file():
        return out
    if complete_checkpoints(out):
        r = resolve(PretrainRecipe, r, {"training": {"resume_from_checkpoint": "auto"}})
    elif out.exists():
        r = resolve(PretrainRecipe, r, {"training": {"overwrite_output_dir": True}})
    run(r)
    return out


# ---- the study -------------------------------------------------------------------------------------


@dataclass
class StudyResult:
    rows: list[dict]  # one per objective x budget: flops, suite means per mode, task scores
    text: str
    markdown: Path | None = None
    csv: Path | None = None
    plot: Path | None = None

    def summary(self) -> str:
        return f"\n{self.text}\n\nstudy written to {self.markdown}, {self.csv} and {self.plot}"


def parts(recipe: StudyRecipe) -> list[tuple[str, float]]:
    s = recipe.study
    return [(o, 0.0) if o == RANDOM else (o, f) for o in s.objectives for f in (s.budgets if o != RANDOM else [0])]


def part_name(objective: str, fraction: float) -> str:
    return RANDOM if objective == RANDOM else f"{slug(objective)}-budget-{fraction:g}"


def study(recipe=None, overrides=None, **kwargs) -> StudyResult:
    """Run (or continue) a study and write study.md, study.csv and study.png into output_dir."""
    from toolkit.benchmarking import benchmark

    r = resolve(StudyRecipe, recipe, overrides, **kwargs)
    out = Path(r.output_dir)
    suite, _ = suite_runs(r)  # the suite is checked before anything is built
    corpus = out / "corpus.txt"
    if not corpus.is_file():
        stats = build_corpus(r, corpus)
        print(
            f"study corpus: {stats['documents']} documents -> {corpus} ({stats['dropped_train_texts']} training texts left out: also held out)"
        )
    tokenizer = train_tokenizer_once(r, corpus, out / "tokenizer")

    rows = []
    for objective, fraction in parts(r):
        name = part_name(objective, fraction)
        done = out / "parts" / f"{name}.json"
        if done.is_file():
            rows.append(json.loads(done.read_text()))
            continue
        print(f"\n==== study: {name}")
        if objective == RANDOM:
            ckpt = random_init(r, tokenizer)
        else:
            ckpt = pretrain_part(r, objective, fraction, corpus, tokenizer)
        pretrained = json.loads((ckpt / "results.json").read_text())
        result = benchmark(ckpt, suite, output_dir=out / "benchmark" / name)
        row = {
            "objective": objective,
            "budget": fraction,
            # results.json keeps the last logged interval's train_flops (train_train_flops) until the
            # engine lists train_flops among its run facts
            "train_flops": pretrained.get("train_flops", pretrained.get("train_train_flops", 0.0)),
            "steps": pretrained.get("steps", 0),
            "nsp_accuracy": pretrained.get("eval_nsp_accuracy"),
            "checkpoint": str(ckpt),
        }
        for t in result.table:
            key = "suite" if t["task"] == "suite mean" else t["task"]
            row[f"{t['mode']}/{key}"] = t["mean"]
            row[f"{t['mode']}/{key}_std"] = t["std"]
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps(row, indent=2) + "\n")
        rows.append(row)
    return write_study(r, rows, suite.modes)


def verdict(rows: list[dict], mode: str) -> str:
    """Plain words: at the full budget, which objective scored best, and how each compares to random init."""
    key = f"{mode}/suite"
    floor = next((x[key] for x in rows if x["objective"] == RANDOM), None)
    top = max(x["budget"] for x in rows)
    final = sorted((x for x in rows if x["objective"] != RANDOM and x["budget"] == top), key=lambda x: -x[key])
    if not final:
        return "Only random initialisation was run: nothing to compare."
    lines = [
        f"At the full budget ({final[0]['train_flops']:.3g} FLOPs), {final[0]['objective']} scores best on the "
        f"suite mean in {mode} fine-tuning ({final[0][key]:.3f})."
    ]
    if floor is not None:
        for x in final:
            diff = 100 * (x[key] - floor)
            word = "beats" if diff > 0 else "does not beat"
            lines.append(f"{x['objective']} {word} random initialisation ({floor:.3f}) by {diff:+.1f} points.")
    nsp = [x for x in final if x.get("nsp_accuracy") is not None]
    for x in nsp:
        learned = "learned" if x["nsp_accuracy"] > 0.6 else "was not learned (chance is 0.5)"
        lines.append(f"Next-sentence prediction {learned}: held-out NSP accuracy {x['nsp_accuracy']:.2f}.")
    return " ".join(lines)


def write_study(r: StudyRecipe, rows: list[dict], modes: list) -> StudyResult:
    import csv

    out = Path(r.output_dir)
    header = "| objective | budget | train FLOPs | " + " | ".join(f"suite ({m})" for m in modes) + " |"
    lines = [header, "| --- | ---: | ---: | " + " | ".join("---:" for _ in modes) + " |"]
    for x in rows:
        cells = [f"{x[f'{m}/suite']:.3f} ± {x[f'{m}/suite_std']:.3f}" for m in modes]
        lines.append(f"| {x['objective']} | {x['budget']:g} | {x['train_flops']:.3g} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    words = " ".join(verdict(rows, m) for m in modes)
    text = f"{table}\n\n{words}"
    md, csv_path = out / "study.md", out / "study.csv"
    md.write_text(
        f"# Pretraining objectives at equal compute\n\nBudget {r.study.max_flops:.3g} FLOPs, fractions "
        f"{r.study.budgets}, model size {r.model.size}; suite scores are test macro-F1 / Pearson means over the "
        f"suite's tasks, mean ± spread over seeds.\n\n{text}\n"
    )
    keys = list(dict.fromkeys(k for x in rows for k in x))
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    png = plot(rows, modes[-1], out / "study.png")
    return StudyResult(rows=rows, text=text, markdown=md, csv=csv_path, plot=png)


def plot(rows: list[dict], mode: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = f"{mode}/suite"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for objective in dict.fromkeys(x["objective"] for x in rows):
        mine = sorted((x for x in rows if x["objective"] == objective), key=lambda x: x["train_flops"])
        if objective == RANDOM:
            ax.axhline(mine[0][key], color="grey", linestyle="--", label="random init")
            continue
        ax.errorbar(
            [x["train_flops"] for x in mine],
            [x[key] for x in mine],
            yerr=[x[f"{key}_std"] for x in mine],
            marker="o",
            capsize=3,
            label=objective,
        )
    ax.set_xlabel("pretraining FLOPs")
    ax.set_ylabel(f"suite mean ({mode} fine-tuning)")
    ax.set_title("Downstream suite score against pretraining compute")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
