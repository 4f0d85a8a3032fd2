"""`toolkit study` on tiny models and a tiny budget: every objective and budget gives a row, a killed
study finishes without redoing finished parts, and no held-out suite text reaches pretraining."""

from __future__ import annotations

import csv
import random

import pytest
from conftest import TINY_GPT, TINY_MODEL, labelled_sentence, shakespeare_file


@pytest.fixture(scope="module")
def study_inputs(tmp_path_factory):
    out = tmp_path_factory.mktemp("study-inputs")
    rng = random.Random(0)
    reviews = out / "reviews.csv"
    with reviews.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["review", "stars"])
        w.writerows((labelled_sentence(rng, i % 2), "pos" if i % 2 else "neg") for i in range(48))
    lines = [ln.strip() for ln in shakespeare_file("hamlet_gut.txt").read_text(errors="replace").splitlines()]
    lines = [ln for ln in lines if len(ln) > 20][500:900]
    dialog = out / "dialog.csv"
    with dialog.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["statement", "reply"])
        w.writerows(zip(lines[::2], lines[1::2]))
    return reviews, dialog


def study_recipe(out, reviews, dialog, objectives=("random", "mlm", "mlm+nsp", "rtd", "clm")) -> dict:
    suite = {
        "tasks": [{"id": "reviews", "train_file": str(reviews), "text_fields": ["review"], "label_field": "stars"}],
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
    return {
        "output_dir": str(out),
        "model": {"size": "tiny", "config_overrides": dict(TINY_MODEL)},
        "tokenizer": {"vocab_size": 400},
        "data": {"max_seq_length": 32, "validation_split_percentage": 10},
        "objective": {"generator_hidden_fraction": 0.5},
        "training": {
            "per_device_train_batch_size": 8,
            "learning_rate": 2e-3,
            "logging_steps": 1,
            "report_to": [],
            "eval_on_start": False,
        },
        "study": {
            "objectives": list(objectives),
            "max_flops": 1.5e9,
            "budgets": [0.5, 1.0],
            "suite": None,
            "suite_overrides": suite,
            "unlabelled": [{"file": str(dialog), "text_fields": ["statement", "reply"]}],
            "gpt2_config_overrides": dict(TINY_GPT),  # the same size as the tiny BERT
        },
    }


def test_no_held_out_suite_text_reaches_the_pretraining_corpus(tmp_path, study_inputs):
    from toolkit.config import resolve
    from toolkit.finetuning.tasks import load_task
    from toolkit.studies import StudyRecipe, build_corpus, suite_runs

    reviews, dialog = study_inputs
    recipe = resolve(StudyRecipe, study_recipe(tmp_path / "s", reviews, dialog))
    stats = build_corpus(recipe, tmp_path / "corpus.txt")
    lines = set((tmp_path / "corpus.txt").read_text().splitlines())
    data = load_task(suite_runs(recipe)[1][0].recipe.task)  # the splits the benchmark fine-tunes on
    held = set(data.validation["review"]) | set(data.test["review"])
    train = set(data.train["review"])
    assert held and not lines & held
    assert (train - held) <= lines  # every training text that is not also held out is there
    assert stats["dropped_train_texts"] == len([t for t in data.train["review"] if t in held])
    assert "Reads for the dialog" not in lines and any("," in ln for ln in lines)  # the dialog rows came in


def test_every_objective_and_budget_gives_a_row_and_a_killed_study_redoes_nothing(tmp_path, study_inputs, monkeypatch):
    import toolkit
    from toolkit import benchmarking, pretraining

    reviews, dialog = study_inputs
    recipe = study_recipe(tmp_path / "s", reviews, dialog)
    calls = {"pretrain": [], "benchmark": []}
    real_pretrain, real_benchmark = pretraining.run, benchmarking.benchmark

    def counting_pretrain(r):
        calls["pretrain"].append(r.output_dir)
        return real_pretrain(r)

    def failing_benchmark(model, *a, **k):  # the study is "killed" during the third part's suite
        calls["benchmark"].append(str(model))
        if len(calls["benchmark"]) == 3:
            raise KeyboardInterrupt
        return real_benchmark(model, *a, **k)

    monkeypatch.setattr(pretraining, "run", counting_pretrain)
    monkeypatch.setattr(benchmarking, "benchmark", failing_benchmark)
    with pytest.raises(KeyboardInterrupt):
        toolkit.study(recipe)
    assert len(calls["pretrain"]) == 2  # mlm at 0.5 and 1.0; the killed part's pretraining finished
    first = list(calls["pretrain"])
    calls["pretrain"].clear()
    calls["benchmark"].clear()
    monkeypatch.setattr(
        benchmarking, "benchmark", lambda m, *a, **k: calls["benchmark"].append(str(m)) or real_benchmark(m, *a, **k)
    )
    result = toolkit.study(recipe)
    assert not set(calls["pretrain"]) & set(first)  # finished pretraining runs were not redone
    assert len(calls["benchmark"]) == 9 - 2  # the two finished parts' suites were not rerun
    got = [(r["objective"], r["budget"]) for r in result.rows]
    assert got == [("random", 0), *[(o, b) for o in ("mlm", "mlm+nsp", "rtd", "clm") for b in (0.5, 1.0)]]
    for r in result.rows:
        if r["objective"] != "random":  # each run ends at the first step that spends its share of the budget
            budget, per_step = r["budget"] * 1.5e9, r["train_flops"] / r["steps"]
            assert r["steps"] >= 2 and budget <= r["train_flops"] < budget + 1.25 * per_step
        assert 0 <= r["full/suite"] <= 1
    assert result.rows[0]["train_flops"] == 0
    assert (tmp_path / "s" / "study.png").read_bytes()[:4] == b"\x89PNG"
    assert "random initialisation" in result.text
    with (tmp_path / "s" / "study.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 9


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory, wordpiece_dir):
    """A tiny `BertModel` (no masked-LM head) with its own tokenizer: an existing checkpoint to continue."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(wordpiece_dir)
    out = tmp_path_factory.mktemp("encoder") / "bert"
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **TINY_MODEL)).save_pretrained(
        out
    )
    tokenizer.save_pretrained(out)
    return out


def test_continue_from_checkpoint_rows_pretrain_that_checkpoint_to_the_same_budget(tmp_path, study_inputs, encoder_dir):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    import toolkit
    from toolkit.config import resolve
    from toolkit.errors import ToolkitError
    from toolkit.studies import StudyRecipe, pretrain_recipe

    reviews, dialog = study_inputs
    row = f"continue from {encoder_dir}"
    recipe = study_recipe(tmp_path / "s", reviews, dialog, objectives=("random", "mlm", row))
    recipe["tokenizer"]["extend_vocab"] = 5
    recipe["study"]["budgets"] = [1.0]
    resolved = resolve(StudyRecipe, recipe)
    # the row continues the checkpoint with its own tokenizer; runs from scratch never extend a vocabulary
    cont = pretrain_recipe(resolved, row, 1.0, tmp_path / "corpus.txt", tmp_path / "study-tokenizer")
    scratch = pretrain_recipe(resolved, "mlm", 1.0, tmp_path / "corpus.txt", tmp_path / "study-tokenizer")
    assert (cont.model.model_name_or_path, cont.objective.name, cont.tokenizer.path) == (str(encoder_dir), "mlm", None)
    assert cont.tokenizer.extend_vocab == 5 and scratch.tokenizer.extend_vocab == 0
    assert scratch.model.model_name_or_path is None and scratch.tokenizer.path == str(tmp_path / "study-tokenizer")
    bad = study_recipe(tmp_path / "b", reviews, dialog, objectives=("continue from ",))
    with pytest.raises(ToolkitError, match="names no checkpoint"):
        resolve(StudyRecipe, bad)

    recipe["study"]["objectives"] = ["random", row]
    result = toolkit.study(recipe)
    assert [(r["objective"], r["budget"]) for r in result.rows] == [("random", 0), (row, 1.0)]
    continued = result.rows[1]
    assert 1.5e9 <= continued["train_flops"] < 1.5e9 * 1.5  # the same budget as any objective
    assert 0 <= continued["full/suite"] <= 1 and row in result.text
    model = AutoModelForMaskedLM.from_pretrained(continued["checkpoint"])
    assert model.config.vocab_size == len(AutoTokenizer.from_pretrained(encoder_dir)) + 5
    assert len(AutoTokenizer.from_pretrained(continued["checkpoint"])) == model.config.vocab_size
