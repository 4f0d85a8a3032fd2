"""`toolkit compare` rows beyond one per mode: named variants (a mode plus overrides, e.g. cloze zero-shot
beside cloze fine-tuned) and several seeds per row (mean and spread). The runs themselves are replaced
by a recorder: these tests check what each row would train, not the training."""

from __future__ import annotations

import csv
import random
import statistics
from pathlib import Path

import pytest
import torch
from conftest import labelled_sentence

import toolkit
from toolkit.errors import ToolkitError
from toolkit.finetuning import pipeline
from toolkit.finetuning.config import MODE_LEARNING_RATES


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory) -> Path:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("cmp-data") / "sentiment.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows((labelled_sentence(rng, i % 2), "pos" if i % 2 else "neg") for i in range(64))
    return path


@pytest.fixture(scope="module")
def mlm(tmp_path_factory, wordpiece_dir) -> Path:
    """A tiny masked LM (with its head), enough for every mode's recipe to resolve."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    tokenizer = AutoTokenizer.from_pretrained(wordpiece_dir)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        pad_token_id=tokenizer.pad_token_id,
    )
    out = tmp_path_factory.mktemp("cmp-mlm") / "mlm"
    BertForMaskedLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def spec(out, model, data, **compare) -> dict:
    return {
        "output_dir": str(out),
        "model": {"model_name_or_path": str(model)},
        "task": {"train_file": str(data), "max_seq_length": 24, "validation_split": 0.25, "test_split": 0.25},
        "finetune": {"mode": "full"},
        "prompt": {"template": "{text} it was {mask} .", "verbalizer": {"neg": "foul", "pos": "good"}},
        "training": {"num_train_epochs": 2, "seed": 0},
        "compare": compare,
    }


ZERO_SHOT = {"cloze-zero-shot": {"finetune.mode": "cloze", "training.num_train_epochs": 0}}


@pytest.fixture
def recorded(monkeypatch):
    """Replaces the run of each row by a record of its recipe; the test accuracy is 0.5 + seed / 100."""
    runs = []

    def fake_run(r):
        runs.append(r)
        metrics = {"test_accuracy": 0.5 + r.training.seed / 100, "trainable_share": 1.0, "epochs": 0.0}
        return pipeline.FinetuneResult(output_dir=Path(r.output_dir), metrics=metrics)

    monkeypatch.setattr(pipeline, "run", fake_run)
    return runs


def test_variants_are_rows_with_their_own_mode_overrides_and_rate(tmp_path, mlm, sentiment, recorded):
    s = spec(tmp_path / "cmp", mlm, sentiment, modes=["cloze-zero-shot", "cloze", "lora", "full"], variants=ZERO_SHOT)
    s["compare"]["mode_overrides"] = {"cloze-zero-shot": {"prompt.template": "{mask} : {text}"}}
    result = toolkit.compare(s)
    seen = {Path(r.output_dir).name: r for r in recorded}
    assert list(seen) == ["cloze-zero-shot", "cloze", "lora", "full"]
    assert {n: r.finetune.mode for n, r in seen.items()} == {
        "cloze-zero-shot": "cloze",
        "cloze": "cloze",
        "lora": "lora",
        "full": "full",
    }
    assert {n: r.training.num_train_epochs for n, r in seen.items()} == {
        "cloze-zero-shot": 0,
        "cloze": 2,
        "lora": 2,
        "full": 2,
    }
    rates = [MODE_LEARNING_RATES[m] for m in ("cloze", "cloze", "lora", "full")]
    assert [r.training.learning_rate for r in recorded] == rates
    assert seen["cloze-zero-shot"].prompt.template == "{mask} : {text}"  # the row's own overrides on top
    assert seen["cloze"].prompt.template == "{text} it was {mask} ."
    assert [row["mode"] for row in result.rows] == ["cloze-zero-shot", "cloze", "lora", "full"]
    assert [row["learning_rate"] for row in result.rows] == rates
    assert "| cloze-zero-shot |" in result.markdown.read_text()


@pytest.mark.parametrize(
    "variants, modes, message",
    [
        ({"full": {"finetune.mode": "full"}}, ["full"], "has the name of a mode"),
        ({"zs": {"training.num_train_epochs": 0}}, ["zs"], "sets no finetune.mode"),
        ({"zs": {"finetune.mode": "cloze", "task.shots": 4}}, ["zs"], "changes task.shots"),
        ({"zs": {"finetune.mode": "clozed"}}, ["zs"], "compare.variants.zs.finetune.mode"),
        (ZERO_SHOT, ["cloze-zero-shots"], "compare.modes"),
    ],
)
def test_bad_variants_are_refused_before_anything_runs(tmp_path, mlm, sentiment, recorded, variants, modes, message):
    with pytest.raises(ToolkitError, match=message):
        toolkit.compare(spec(tmp_path / "bad", mlm, sentiment, modes=modes, variants=variants))
    assert recorded == []


def test_seeds_run_every_row_per_seed_and_report_mean_and_spread(tmp_path, mlm, sentiment, recorded, capsys):
    s = spec(tmp_path / "k", mlm, sentiment, modes=["cloze-zero-shot", "full"], variants=ZERO_SHOT, seeds=[1, 2, 4])
    s["task"]["shots"] = 4
    result = toolkit.compare(s)
    assert [(Path(r.output_dir).parent.name, Path(r.output_dir).name, r.training.seed) for r in recorded] == [
        ("cloze-zero-shot", "seed-1", 1),
        ("cloze-zero-shot", "seed-2", 2),
        ("cloze-zero-shot", "seed-4", 4),
        ("full", "seed-1", 1),
        ("full", "seed-2", 2),
        ("full", "seed-4", 4),
    ]
    assert all(r.task.shots == 4 for r in recorded)
    printed = capsys.readouterr().out
    assert "==== compare: full, seed 4 (2 of 2)" in printed and "(3 of 2)" not in printed  # rows, not runs
    accuracies = [0.51, 0.52, 0.54]
    for row in result.rows:
        assert row["seeds"] == 3
        assert row["test_accuracy"] == pytest.approx(statistics.fmean(accuracies))
        assert row["test_accuracy_sd"] == pytest.approx(statistics.stdev(accuracies))
    assert "accuracy sd" in result.table and "seeds [1, 2, 4]" in result.markdown.read_text()
    assert "few-shot: 4 training and 4 validation examples per class" in result.markdown.read_text()
    with pytest.raises(ToolkitError, match="compare.seeds must be distinct"):
        toolkit.compare(spec(tmp_path / "k2", mlm, sentiment, modes=["full"], seeds=[1, 1]))


def test_a_recipes_overrides_for_modes_left_out_stay_unused_and_a_typo_is_refused():
    """`compare.modes=[full, prefix]` on the shipped comparison (which tunes frozen and prompt too) is
    valid; an override for a name that is neither a mode nor a variant is a typo."""
    from toolkit.config import resolve
    from toolkit.finetuning.config import FinetuneRecipe

    recipe = str(Path(__file__).parent.parent / "recipes" / "finetune-compare.yaml")
    r = resolve(FinetuneRecipe, recipe, {"compare.modes": ["full", "prefix"]})
    assert r.compare.modes == ["full", "prefix"] and "frozen" in r.compare.mode_overrides
    with pytest.raises(ToolkitError, match="'ful', which is neither a mode nor a variant"):
        resolve(FinetuneRecipe, recipe, {"compare.mode_overrides.ful": {"training.learning_rate": 1.0}})
