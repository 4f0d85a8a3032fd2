"""Built-in suite tasks and `toolkit benchmark`: real data from installed packages, tiny models."""

from __future__ import annotations

import pytest

from toolkit.finetuning.config import TaskArgs
from toolkit.finetuning.tasks import NEAR_NEUTRAL, load_task


def test_question_type_has_six_coarse_classes_and_no_question_in_two_splits():
    data = load_task(TaskArgs(name="question-type"))
    assert data.labels == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    assert sum(data.rows.values()) == 5381  # each TREC training question once (the file repeats them)
    train, test = set(data.train["text"]), set(data.test["text"]) | set(data.validation["text"])
    assert not train & test
    assert set(data.test["labels"]) == set(range(6))  # stratified: even ABBR (86 rows) reaches test


@pytest.mark.parametrize(("name", "total", "kept"), [("amazon-sentiment", 3708, 2985), ("tweet-sentiment", 4200, 3432)])
def test_vader_domains_drop_near_neutral_sentences(name, total, kept):
    import csv

    from toolkit.finetuning.tasks import BUILTIN_TASKS
    from toolkit.paths import resolve_path

    data = load_task(TaskArgs(name=name))
    assert sum(data.rows.values()) == kept
    path = resolve_path(BUILTIN_TASKS[name].train_file)
    with open(path, encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert len(rows) == total
    ratings: dict = {}  # a few short snippets ("!") occur more than once, with different ratings
    for r in rows:
        ratings.setdefault(r["text"], []).append(float(r["sentiment"]))
    for text, label in zip(data.train["text"], data.train["labels"]):
        # kept only with a clear sign, and "positive" (class 1) exactly when the mean rating is above 0
        assert any(abs(x) >= NEAR_NEUTRAL and (x > 0) == (label == 1) for x in ratings[text])
    assert sum(abs(x[0]) < NEAR_NEUTRAL for x in ratings.values()) > 0.1 * len(ratings)  # there was something to drop


# ---- toolkit benchmark ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory, wordpiece_dir):
    """A tiny BERT folder (random weights) with the toolkit's tokenizer: what a benchmark fine-tunes."""
    import torch
    from conftest import TINY_MODEL
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    out = tmp_path_factory.mktemp("bench") / "bert"
    tokenizer = AutoTokenizer.from_pretrained(wordpiece_dir)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **TINY_MODEL)
    BertForMaskedLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def reviews_csv(tmp_path_factory):
    import csv
    import random

    from conftest import labelled_sentence

    path = tmp_path_factory.mktemp("bench-data") / "reviews.csv"
    rng = random.Random(0)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["review", "stars"])
        writer.writerows((labelled_sentence(rng, i % 2), "pos" if i % 2 else "neg") for i in range(48))
    return path


def tiny_suite(reviews_csv, **task) -> dict:
    return {
        "tasks": [
            {"id": "reviews", "train_file": str(reviews_csv), "text_fields": ["review"], "label_field": "stars", **task}
        ],
        "seeds": 1,
        "recipe": {
            "task": {"max_seq_length": 16, "validation_split": 0.25, "test_split": 0.25},
            "training": {
                "num_train_epochs": 1,
                "per_device_train_batch_size": 8,
                "learning_rate": 1e-3,
                "report_to": [],
            },
        },
    }


def test_a_suite_with_a_user_csv_task_runs_and_a_second_run_reads_the_finished_folders(
    tmp_path, tiny_bert, reviews_csv, monkeypatch
):
    import csv
    import json

    import toolkit
    from toolkit.finetuning import pipeline

    result = toolkit.benchmark(tiny_bert, tiny_suite(reviews_csv), output_dir=tmp_path / "bench")
    run_dir = tmp_path / "bench" / "reviews" / "full" / "seed-42"
    saved = json.loads((run_dir / "results.json").read_text())
    assert [(r["task"], r["mode"], r["seed"], r["metric"]) for r in result.rows] == [
        ("reviews", "full", 42, "macro_f1")
    ]
    assert result.rows[0]["score"] == saved["test_macro_f1"] and result.rows[0]["test_rows"] == 12
    assert result.suite_mean("full") == saved["test_macro_f1"]  # one task: the suite mean is its score
    assert "| reviews | macro_f1 |" in (tmp_path / "bench" / "benchmark.md").read_text()
    with (tmp_path / "bench" / "benchmark.csv").open() as fh:
        assert [row["task"] for row in csv.DictReader(fh)] == ["reviews"]
    assert (tmp_path / "bench" / "benchmark.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "suite mean" in result.summary()

    def no_training(recipe):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(pipeline, "run", no_training)
    again = toolkit.benchmark(tiny_bert, tiny_suite(reviews_csv), output_dir=tmp_path / "bench")
    assert again.rows == result.rows


def test_aggregate_gives_mean_and_spread_over_seeds_and_the_suite_mean_per_seed():
    from toolkit.benchmarking import aggregate

    rows = [
        dict(task=t, mode="full", seed=s, metric="macro_f1", score=v)
        for t, s, v in [("a", 1, 0.6), ("a", 2, 0.8), ("b", 1, 0.4), ("b", 2, 0.4)]
    ]
    table = {r["task"]: r for r in aggregate(rows)}
    assert table["a"]["mean"] == pytest.approx(0.7) and table["a"]["std"] == pytest.approx(0.141421, rel=1e-4)
    assert table["b"]["std"] == 0.0
    assert table["suite mean"]["mean"] == pytest.approx(0.55)  # seeds: (0.6+0.4)/2, (0.8+0.4)/2
    assert table["suite mean"]["std"] == pytest.approx(0.070711, rel=1e-4)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"label_field": "rating"}, "no column 'rating'"),
        ({"tasks": ["movie-sentimnet"]}, "unknown task.name 'movie-sentimnet' (did you mean 'movie-sentiment'?)"),
        ({"tasks": []}, "the suite has no tasks"),
    ],
    ids=["missing-column", "unknown-task", "empty-suite"],
)
def test_bad_suites_stop_with_one_clear_error_before_any_training(
    tmp_path, tiny_bert, reviews_csv, change, message, monkeypatch
):
    import toolkit
    from toolkit.errors import ToolkitError
    from toolkit.finetuning import pipeline

    suite = tiny_suite(reviews_csv, **{k: v for k, v in change.items() if k != "tasks"})
    if "tasks" in change:
        suite["tasks"] = change["tasks"]
    monkeypatch.setattr(pipeline, "run", lambda recipe: pytest.fail("training started"))
    with pytest.raises(ToolkitError) as err:
        toolkit.benchmark(tiny_bert, suite, output_dir=tmp_path / "bench")
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "bench").exists()


def test_cli_benchmark_reports_a_bad_suite_with_status_2(tmp_path, tiny_bert):
    from conftest import run_cli

    suite = tmp_path / "suite.yaml"
    suite.write_text("tasks: []\n")
    proc = run_cli("benchmark", str(tiny_bert), "--suite", str(suite), "--output-dir", str(tmp_path / "b"))
    assert proc.returncode == 2 and "error: the suite has no tasks" in proc.stderr
    assert "recipes/suite-default.yaml" in run_cli("benchmark", "--help").stdout


def test_against_random_init_benchmarks_a_fresh_twin_and_reports_each_task(tmp_path, tiny_bert, reviews_csv):
    """The twin has the checkpoint's architecture, config and tokenizer and fresh weights (seed 0: here
    exactly the weights tiny_bert was built with), runs the same suite, and each row's difference is
    the checkpoint's score minus the twin's."""
    import shutil

    import torch
    from safetensors.torch import load_file
    from transformers import BertForMaskedLM

    import toolkit

    model = tmp_path / "model"  # "pretrained": the same architecture, other weights
    shutil.copytree(tiny_bert, model)
    torch.manual_seed(1)
    BertForMaskedLM(BertForMaskedLM.config_class.from_pretrained(tiny_bert)).save_pretrained(model)

    result = toolkit.benchmark(model, tiny_suite(reviews_csv), output_dir=tmp_path / "b", against_random_init=True)
    twin = tmp_path / "b" / "random-init" / "model"
    assert (twin / "tokenizer.json").read_text() == (tiny_bert / "tokenizer.json").read_text()
    fresh, mine, seed0 = (load_file(str(p / "model.safetensors")) for p in (twin, model, tiny_bert))
    assert all(torch.equal(fresh[k], seed0[k]) for k in seed0)  # freshly initialised by seed 0
    assert not all(torch.equal(fresh[k], mine[k]) for k in mine)
    assert result.floor.rows[0]["score"] == result.floor.suite_mean("full")
    row = next(r for r in result.versus if r["task"] == "reviews")
    assert row["pretrained"] == result.rows[0]["score"] and row["random_init"] == result.floor.rows[0]["score"]
    assert row["difference"] == pytest.approx(row["pretrained"] - row["random_init"])
    won = int(row["difference"] > 0)
    assert f"on {won} of 1 tasks" in result.verdict
    text = (tmp_path / "b" / "vs-random-init.md").read_text()
    assert f"| reviews | full | macro_f1 | {row['pretrained']:.3f} | {row['random_init']:.3f} |" in text
    assert (tmp_path / "b" / "random-init" / "benchmark.md").is_file()
