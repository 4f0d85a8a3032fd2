"""Task types beyond sentence classification: token classification, question answering and
generation on tiny models built from configs (seconds each)."""

from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path

import pytest
import torch
from conftest import FILLER, TINY_GPT, TINY_MODEL

import toolkit
from toolkit.errors import ToolkitError
from toolkit.finetuning.config import TaskArgs
from toolkit.finetuning.types.base import TypeData
from toolkit.finetuning.types.question_answering import encode_questions, postprocess, squad_metrics
from toolkit.finetuning.types.token_classification import encode_words, tag_metrics, word_predictions

NAMES = ["anna", "hamlet", "horatio", "ophelia"]
PLACES = ["denmark", "elsinore", "norway"]


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory, wordpiece_dir) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    out = tmp_path_factory.mktemp("types") / "bert"
    tok = AutoTokenizer.from_pretrained(wordpiece_dir)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tok), max_position_embeddings=128, pad_token_id=tok.pad_token_id, **TINY_MODEL)
    BertForMaskedLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def gpt_dir(tmp_path_factory, bpe_dir) -> Path:
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    out = tmp_path_factory.mktemp("types") / "gpt"
    tok = AutoTokenizer.from_pretrained(bpe_dir)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tok), n_positions=128, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, **TINY_GPT
    )
    GPT2LMHeadModel(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _tagged_sentence(rng) -> tuple[list[str], list[str]]:
    words, tags = [], []
    for _ in range(rng.randint(3, 8)):
        r = rng.random()
        if r < 0.2:
            words += ["lord", rng.choice(NAMES)]
            tags += ["B-PER", "I-PER"]
        elif r < 0.35:
            words.append(rng.choice(PLACES))
            tags.append("B-LOC")
        else:
            words.append(rng.choice(FILLER))
            tags.append("O")
    return words, tags


@pytest.fixture(scope="session")
def conll_file(tmp_path_factory) -> Path:
    rng = random.Random(0)
    lines = ["-DOCSTART- -X- O", ""]
    for i in range(40):
        words, tags = _tagged_sentence(rng)
        if i == 0:  # longer than a window of 16 tokens
            words, tags = words * 4, tags * 4
        lines += [f"{w} NN {t}" for w, t in zip(words, tags)] + [""]
    path = tmp_path_factory.mktemp("ner") / "train.conll"
    path.write_text("\n".join(lines))
    return path


def _recipe(out, model, **task) -> dict:
    return {
        "output_dir": str(out),
        "model": {"model_name_or_path": str(model)},
        "task": {"max_seq_length": 16, "validation_split": 0.2, "test_split": 0.2, **task},
        "finetune": {"mode": "full"},
        "training": {
            "num_train_epochs": 1,
            "per_device_train_batch_size": 8,
            "per_device_eval_batch_size": 8,
            "learning_rate": 1e-3,
            "logging_steps": 1,
            "seed": 0,
        },
    }


# ---- token classification -------------------------------------------------------------------------


def test_labels_go_on_the_first_sub_word_and_long_sentences_become_windows(bert_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bert_dir)
    words = ["hamlet", "zyxquaflorb", "spoke"]
    assert len(tok.tokenize("zyxquaflorb")) > 2  # the test needs a word of several pieces
    data = TypeData("token_classification", None, None, None, {}, ["O", "B-PER", "I-PER"], "")
    task = TaskArgs(max_seq_length=32)
    first = encode_words([words], [["O", "B-PER", "O"]], tok, task, data)[0]
    counts = [len(tok.tokenize(w)) for w in words]

    def expected(rest):  # [CLS] word pieces... [SEP]; each word's tag on its first piece
        out = [-100]
        for n, tag, other in zip(counts, [0, 1, 0], rest):
            out += [tag] + [other] * (n - 1)
        return out + [-100]

    assert first["labels"] == expected([-100, -100, -100])
    everyone = encode_words(
        [words], [["O", "B-PER", "O"]], tok, TaskArgs(max_seq_length=32, label_all_tokens=True), data
    )
    assert everyone[0]["labels"] == expected([0, 2, 0])  # B-PER's later pieces get I-PER
    assert everyone[0]["word_labels"] == first["labels"]  # metrics read first pieces only

    long_words = [FILLER[i % len(FILLER)] for i in range(30)]
    tags = ["O"] * 30
    windows = encode_words([long_words], [tags], tok, TaskArgs(max_seq_length=8), data)
    assert len(windows) >= 4 and all(len(x) <= 8 for x in windows["input_ids"])
    assert sum(sum(x) for x in windows["word_start"]) == 30  # every word in exactly one window
    examples = {
        "pred": torch.tensor(
            [[p if p != -100 else -100 for p in row] + [-100] * (8 - len(row)) for row in windows["word_labels"]]
        ),
        "sentence": torch.tensor(windows["sentence"]),
    }
    assert word_predictions(examples, 1, data.labels) == [tags]


def test_seqeval_entity_f1_equals_a_hand_computed_value():
    labels = ["O", "B-PER", "I-PER", "B-LOC", "B-ORG"]
    ids = {n: i for i, n in enumerate(labels)}
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O"]]
    rows = lambda seqs: torch.tensor([[ids[t] for t in s] + [-100] * (4 - len(s)) for s in seqs])  # noqa: E731
    m = tag_metrics({"pred": rows(pred), "label": rows(gold), "sentence": torch.tensor([0, 1])}, labels, True)
    # gold entities PER, LOC, ORG; predicted PER, ORG, ORG; right: PER and the second ORG
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3) and m["token_accuracy"] == pytest.approx(5 / 6)


def test_token_classification_trains_predicts_one_tag_per_word_and_runs_in_a_pipeline(tmp_path, bert_dir, conll_file):
    from transformers import AutoModelForTokenClassification, AutoTokenizer, pipeline

    result = toolkit.finetune(_recipe(tmp_path / "ner", bert_dir, train_file=str(conll_file)))
    m = result.metrics
    assert m["task_type"] == "token_classification"
    assert 0 <= m["test_f1"] <= 1 and 0 <= m["test_token_accuracy"] <= 1 and "eval_f1" in m
    out = result.output_dir
    assert {"config.json", "model.safetensors", "README.md", "test_predictions.jsonl", "toolkit_task.json"} <= {
        p.name for p in out.iterdir()
    }
    model = AutoModelForTokenClassification.from_pretrained(out)
    assert model.config.id2label[0] == "O" and set(model.config.label2id) == {"O", "B-PER", "I-PER", "B-LOC"}
    tagger = pipeline("token-classification", model=model, tokenizer=AutoTokenizer.from_pretrained(out))
    assert isinstance(tagger("lord hamlet spoke in denmark"), list)

    path, scores = toolkit.predict(out, str(conll_file), tmp_path / "tags.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 40 and all(len(r["predictions"]) == len(r["tokens"]) for r in rows)
    assert len(rows[0]["tokens"]) > 16 and {t for r in rows for t in r["predictions"]} <= set(model.config.label2id)
    assert 0 <= scores["f1"] <= 1 and "token_accuracy" in scores
    predicted = [json.loads(line)["predictions"] for line in (out / "test_predictions.jsonl").read_text().splitlines()]
    assert predicted and all(isinstance(p, list) for p in predicted)


# ---- question answering ---------------------------------------------------------------------------


def test_official_squad_normalisation_and_scores():
    from toolkit.finetuning.types.question_answering import normalize_answer

    assert normalize_answer("The  Cat, sat!") == "cat sat"
    # q1: tokens {cat, sat} vs {cat, sat, down}: P 1, R 2/3, F1 0.8, EM 0; q2: exact after normalising;
    # q3 (v2.0): unanswerable and answered with nothing: 1.
    m = squad_metrics(
        {"1": "the cat sat", "2": "Paris.", "3": ""}, {"1": ["A cat sat down"], "2": ["London", "paris"], "3": []}
    )
    assert m["exact_match"] == pytest.approx(200 / 3) and m["f1"] == pytest.approx((80 + 100 + 100) / 3)


def test_answer_in_the_second_window_is_found_with_its_exact_text_and_no_answer_works(bert_dir):
    import datasets
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bert_dir)
    context = " ".join(FILLER * 3) + " the ghost walks at midnight upon the platform."
    answer = "midnight"
    start = context.index(answer)
    raw = datasets.Dataset.from_dict(
        {
            "id": ["a", "b"],
            "question": ["when does the ghost walk?", "who is the king?"],
            "context": [context, "the queen spoke."],
            "answers": [{"text": [answer], "answer_start": [start]}, {"text": [], "answer_start": []}],
        }
    )
    task = TaskArgs(max_seq_length=32, doc_stride=8)
    features = encode_questions(raw, tok, task)
    of_a = [i for i, e in enumerate(features["example"]) if e == 0]
    assert len(of_a) >= 2
    labelled = [i for i in of_a if features["start_positions"][i] > 0]
    assert labelled and labelled[0] != of_a[0]  # the answer is not in the first window
    f = labelled[0]
    offsets, s, e = features["offsets"][f], features["start_positions"][f], features["end_positions"][f]
    assert context[offsets[s][0] : offsets[e][1]] == answer

    # logits that point at the labelled span of that window (and at [CLS] for the other question)
    n = len(features)
    start_logits = torch.full((n, 32), -5.0)
    end_logits = torch.full((n, 32), -5.0)
    start_logits[f, s], end_logits[f, e] = 5.0, 5.0
    b = [i for i, ex in enumerate(features["example"]) if ex == 1][0]
    start_logits[b, 0], end_logits[b, 0] = 8.0, 8.0
    assert postprocess(features, raw, start_logits, end_logits, task, no_answer=True) == {"a": answer, "b": ""}
    # SQuAD v1.1 has no unanswerable questions: the best span wins
    assert postprocess(features, raw, start_logits, end_logits, task, no_answer=False)["b"] != ""


def _squad(path: Path, rng) -> Path:
    paragraphs = []
    for i in range(24):
        name, place = rng.choice(NAMES), rng.choice(PLACES)
        context = f"{' '.join(rng.choices(FILLER, k=4))} lord {name} lives in {place} ."
        qas = [
            {
                "id": f"q{i}",
                "question": "where does the lord live?",
                "answers": [{"text": place, "answer_start": context.index(f"in {place}") + 3}],
            }
        ]
        if i % 4 == 0:
            qas.append({"id": f"n{i}", "question": "who is the queen?", "answers": [], "is_impossible": True})
        paragraphs.append({"context": context, "qas": qas})
    path.write_text(json.dumps({"version": "v2.0", "data": [{"title": "t", "paragraphs": paragraphs}]}))
    return path


PIPELINE_WITHOUT_TOOLKIT = """
import importlib.abc, json, sys


class NoToolkit(importlib.abc.MetaPathFinder):  # the pipeline must not need the toolkit
    def find_spec(self, name, path=None, target=None):
        if name == "toolkit" or name.startswith("toolkit."):
            raise ImportError("toolkit is blocked in this process")


sys.meta_path.insert(0, NoToolkit())
from transformers import pipeline

qa = pipeline("question-answering", model=sys.argv[1], trust_remote_code=True)
rows = [json.loads(line) for line in open(sys.argv[2])]
answers = [qa(question=r["question"], context=r["context"]) for r in rows]
assert not [m for m in sys.modules if m == "toolkit" or m.startswith("toolkit.")]
print(json.dumps(answers))
"""


def test_question_answering_trains_on_squad_json_and_answers_through_a_pipeline(tmp_path, bert_dir, capsys):
    import subprocess
    import sys

    from transformers import AutoModelForQuestionAnswering

    from toolkit.finetuning.types.spans import DEFAULTS

    squad = _squad(tmp_path / "squad.json", random.Random(1))
    result = toolkit.finetune(
        _recipe(tmp_path / "qa", bert_dir, train_file=str(squad), max_seq_length=32, doc_stride=8)
    )
    m = result.metrics
    assert m["task_type"] == "question_answering" and 0 <= m["test_exact_match"] <= 100 and "eval_f1" in m
    out = result.output_dir
    assert json.loads((out / "toolkit_task.json").read_text())["no_answer"] is True
    model = AutoModelForQuestionAnswering.from_pretrained(out).eval()
    batch = {k: torch.tensor([v]) for k, v in result.tokenizer("where?", "lord anna lives in norway .").items()}
    with torch.no_grad():
        assert torch.allclose(model(**batch).start_logits, result.model.eval()(**batch).start_logits, atol=1e-5)
    settings = json.loads((out / "config.json").read_text())["question_answering"]
    assert settings == {**DEFAULTS, "max_seq_length": 32, "doc_stride": 8, "no_answer": True}
    assert {k: getattr(TaskArgs(), k) for k in DEFAULTS if k != "no_answer"} == {  # the pipeline's own defaults
        k: v for k, v in DEFAULTS.items() if k != "no_answer"
    }

    # toolkit predict and the plain transformers pipeline (in a process that cannot import the toolkit)
    path, scores = toolkit.predict(out, str(squad), tmp_path / "answers.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 30 and 0 <= scores["f1"] <= 100
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-I", "-c", PIPELINE_WITHOUT_TOOLKIT, str(out), str(path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    answers = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [a["answer"] for a in answers] == [r["prediction"] for r in rows]  # the same span, every question
    assert any(a["answer"] for a in answers)
    for a, r in zip(answers, rows):
        assert r["context"][a["start"] : a["end"]] == a["answer"] and 0 <= a["score"] <= 1

    # the model card's code runs as written
    card = (out / "README.md").read_text()
    code = card[card.index("```python") + 9 : card.rindex("```")].replace('"."', repr(str(out)))
    capsys.readouterr()
    exec(compile(code, "card", "exec"), {})
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert "'answer':" in printed and "'score':" in printed


@pytest.mark.parametrize("mode", ["lora", "ptuning"])
def test_a_question_answering_adapter_answers_through_its_card_code_as_predict_does(tmp_path, bert_dir, mode):
    squad = _squad(tmp_path / "squad.json", random.Random(8))
    r = _recipe(tmp_path / mode, bert_dir, train_file=str(squad), max_seq_length=32, doc_stride=8)
    r["finetune"] = {"mode": mode, "num_virtual_tokens": 4}
    r["training"]["num_train_epochs"] = 3
    out = toolkit.finetune(r).output_dir
    path, _ = toolkit.predict(out, str(squad), tmp_path / "answers.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    card = (out / "README.md").read_text()
    code = card[card.index("```python") + 9 : card.rindex("```")].replace('"."', repr(str(out)))
    names: dict = {}
    exec(compile(code, "card", "exec"), names)  # the card's code, as written (it builds `qa`)
    answers = [names["qa"](question=x["question"], context=x["context"])["answer"] for x in rows]
    assert answers == [x["prediction"] for x in rows] and any(answers)


# ---- generation -----------------------------------------------------------------------------------


def test_prompt_tokens_carry_minus_100_and_packing_does_not_leak_across_examples(gpt_dir):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolkit.finetuning.types.generation import PackedLM, PaddedLM, encode_examples

    tok = AutoTokenizer.from_pretrained(gpt_dir)
    rows = datasets.Dataset.from_dict(
        {
            "prompt": ["the king spoke", "where is the queen", "hello"],
            "response": ["to his lord", "in denmark", "hi there"],
        }
    )
    enc = encode_examples(rows, tok, TaskArgs(max_seq_length=64))
    n_prompt = len(tok("the king spoke\n", add_special_tokens=False)["input_ids"])
    assert enc[0]["labels"][:n_prompt] == [-100] * n_prompt
    assert enc[0]["labels"][n_prompt:] == enc[0]["input_ids"][n_prompt:] and enc[0]["input_ids"][-1] == tok.eos_token_id
    everything = encode_examples(rows, tok, TaskArgs(max_seq_length=64, train_on_prompt=True))
    assert everything[0]["labels"] == everything[0]["input_ids"]

    model = AutoModelForCausalLM.from_pretrained(gpt_dir).eval()
    packed = PackedLM(enc, tok.pad_token_id or 0, 64)
    assert len(packed) == 1  # all three examples share one row
    batch = packed.__getitems__([0])
    with torch.no_grad():
        together = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
        ).logits[0]
        at = 0
        for i in range(3):
            alone = model(input_ids=torch.tensor([enc[i]["input_ids"]])).logits[0]
            assert torch.allclose(together[at : at + len(alone)], alone, atol=1e-5)
            at += len(alone)
    single = PaddedLM(enc, tok.pad_token_id or 0).__getitems__([0, 1])
    assert single["attention_mask"].shape == single["input_ids"].shape


def test_generation_fine_tunes_and_generates_through_a_pipeline(tmp_path, gpt_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    rng = random.Random(2)
    path = tmp_path / "chat.jsonl"
    with path.open("w") as fh:
        for _ in range(30):
            name = rng.choice(NAMES)
            messages = [
                {"role": "user", "content": f"who is {name}?"},
                {"role": "assistant", "content": f"{name} is a lord."},
            ]
            fh.write(json.dumps({"messages": messages}) + "\n")
    r = _recipe(tmp_path / "gen", gpt_dir, train_file=str(path), max_seq_length=32, max_new_tokens=4, packing=True)
    result = toolkit.finetune(r)
    m = result.metrics
    assert m["task_type"] == "generation" and m["eval_perplexity"] > 1 and "test_rougeL" in m and "test_f1" in m
    out = result.output_dir
    generate = pipeline(
        "text-generation", model=AutoModelForCausalLM.from_pretrained(out), tokenizer=AutoTokenizer.from_pretrained(out)
    )
    text = generate("user: who is anna?\nassistant: ", max_new_tokens=3, do_sample=False, return_full_text=False)
    assert isinstance(text[0]["generated_text"], str)
    path, scores = toolkit.predict(out, str(path), tmp_path / "replies.jsonl")
    replies = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(replies) == 30 and all(isinstance(r["prediction"], str) for r in replies)
    assert 0 <= scores["rougeL"] <= 100 and 0 <= scores["exact_match"] <= 100
    lines = (out / "test_predictions.jsonl").read_text().splitlines()
    assert len(lines) == 6 and all("prediction" in json.loads(line) for line in lines)  # 20% of 30 rows


# ---- bad input, each before training --------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "case, message",
    [
        ("conll_one_column", "needs the word and its tag"),
        ("not_iob", "task.entity_metrics=true needs IOB"),
        ("answer_start", "does not start at answer_start=3"),
        ("chat_without_response", "has no response"),
        ("prompt_without_response", "has no response"),
        ("mode", "finetune.mode=prompt cannot train task.type=token_classification"),
        ("mode_generation", "finetune.mode=frozen cannot train task.type=generation"),
    ],
)
def test_bad_input_stops_before_training_with_one_clear_error(tmp_path, bert_dir, case, message, monkeypatch):
    from toolkit.engine import loop

    monkeypatch.setattr(loop, "train", lambda *a, **k: pytest.fail("training started"))
    task: dict = {}
    mode = "full"
    if case == "conll_one_column":
        task["train_file"] = str(_write(tmp_path / "a.conll", "hamlet B-PER\nspoke\n\nthe O\n"))
    elif case == "not_iob":
        text = "\n\n".join("hamlet NN\nspoke VB" for _ in range(10))
        task.update(train_file=str(_write(tmp_path / "a.conll", text)), entity_metrics=True)  # YAML true
    elif case == "answer_start":
        rows = [
            {"question": "q?", "context": "the king spoke", "answers": {"text": ["king"], "answer_start": [3]}}
        ] * 10
        task.update(
            train_file=str(_write(tmp_path / "a.jsonl", "".join(json.dumps(r) + "\n" for r in rows))), doc_stride=4
        )
    elif case == "chat_without_response":
        rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 9
        rows.append({"messages": [{"role": "user", "content": "hi"}]})
        task["train_file"] = str(_write(tmp_path / "a.jsonl", "".join(json.dumps(r) + "\n" for r in rows)))
    elif case == "prompt_without_response":
        with (tmp_path / "a.csv").open("w", newline="") as fh:
            csv.writer(fh).writerows([["prompt", "response"], *[["hi", "hello"]] * 9, ["hi", ""]])
        task["train_file"] = str(tmp_path / "a.csv")
    elif case == "mode":
        task.update(train_file=str(tmp_path / "x.conll"), type="token_classification")
        mode = "prompt"
    elif case == "mode_generation":
        task.update(train_file=str(tmp_path / "x.csv"), type="generation")
        mode = "frozen"
    r = _recipe(tmp_path / "out", bert_dir, **task)
    r["finetune"]["mode"] = mode
    with pytest.raises(ToolkitError, match=message.replace("(", r"\(").replace(".", r"\.")):
        toolkit.finetune(r)
    assert not (tmp_path / "out").exists()


def test_types_are_inferred_from_columns_and_the_dialogue_task_is_built_in():
    from toolkit.finetuning.tasks import BUILTIN_TASKS
    from toolkit.finetuning.types import infer_type

    task = TaskArgs()
    assert infer_type(["tokens", "ner_tags"], task) == "token_classification"
    assert infer_type(["id", "question", "context", "answers"], task) == "question_answering"
    assert infer_type(["prompt", "response"], task) == "generation"
    assert infer_type(["messages"], task) == "generation"
    assert infer_type(["text", "label"], task) == "sequence_classification"
    assert BUILTIN_TASKS["movie-dialog"].task_type == "generation"


@pytest.mark.parametrize("kind", ["token_classification", "question_answering"])
def test_frozen_mode_encodes_each_window_once_and_trains_the_head_as_the_encoder_run_every_step_would(
    tmp_path, bert_dir, conll_file, kind, monkeypatch
):
    """The frozen mode's head trains on cached per-token vectors: the encoder sees each window of each
    split once, and the result (dropout off) is that of running the fixed encoder at every step."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, BertModel

    from toolkit.finetuning import pipeline as finetuning
    from toolkit.finetuning.types import load_any

    if kind == "token_classification":
        task, head = {"train_file": str(conll_file)}, "classifier.weight"
    else:
        squad = _squad(tmp_path / "squad.json", random.Random(5))
        task, head = {"train_file": str(squad), "max_seq_length": 32, "doc_stride": 8}, "qa_outputs.weight"
    r = _recipe(tmp_path / "cached", bert_dir, **task)
    r["finetune"] = {"mode": "frozen"}
    r["training"].update(num_train_epochs=8, learning_rate=5e-2, eval_on_start=True)
    data = load_any(TaskArgs(**r["task"]), AutoTokenizer.from_pretrained(bert_dir))[2]
    windows = sum(len(split) for split in data.splits().values())

    encoded: list[int] = []
    forward = BertModel.forward

    def counted(self, input_ids=None, *args, **kwargs):
        encoded.append(input_ids.shape[0])
        return forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(BertModel, "forward", counted)
    cached = toolkit.finetune(r)
    assert sum(encoded) == windows  # every window of train, validation and test once, then never again
    assert cached.metrics["feature_seconds"] > 0 and cached.metrics["steps"] >= 6

    # the same run with the frozen encoder run at every step instead of its cached vectors
    encoded.clear()
    monkeypatch.setattr(
        finetuning, "_frozen_features", lambda recipe, data, *a: (data.train, data.validation, data.test, 0)
    )
    r["output_dir"] = str(tmp_path / "every-step")
    every = toolkit.finetune(r)
    assert sum(encoded) > 3 * len(data.train)
    a, b = cached.metrics, every.metrics
    assert a["eval_loss"] < a["initial_eval_loss"]  # the head learned
    shared = [k for k in a if k.startswith(("eval_", "test_")) and isinstance(a[k], float) and k != "eval_runtime"]
    assert {"eval_loss", "test_loss", "eval_f1", "test_f1"} <= set(shared)
    for key in shared:
        assert a[key] == pytest.approx(b[key], abs=1e-4), key
    weights = [load_file(str(run.output_dir / "model.safetensors")) for run in (cached, every)]
    assert torch.allclose(weights[0][head], weights[1][head], atol=1e-5)

    # the saved folder (encoder + trained head, run whole by `predict`) predicts what the cached vectors did
    saved = [json.loads(line) for line in (cached.output_dir / "test_predictions.jsonl").read_text().splitlines()]
    if kind == "token_classification":
        again = tmp_path / "test.jsonl"
        again.write_text("".join(json.dumps({"tokens": x["tokens"], "tags": x["tags"]}) + "\n" for x in saved))
        path, _ = toolkit.predict(cached.output_dir, str(again), tmp_path / "tags.jsonl")
        predicted = [json.loads(line)["predictions"] for line in path.read_text().splitlines()]
        assert predicted == [x["predictions"] for x in saved]
    else:
        path, _ = toolkit.predict(cached.output_dir, str(squad), tmp_path / "answers.jsonl")
        predicted = {x["id"]: x["prediction"] for x in map(json.loads, path.read_text().splitlines())}
        assert [predicted[x["id"]] for x in saved] == [x["prediction"] for x in saved]


def test_compare_of_token_classification_modes_keeps_the_frozen_encoder_and_trains_a_lora_adapter(
    tmp_path, bert_dir, conll_file
):
    from peft import PeftModel
    from transformers import AutoModelForTokenClassification, BertForMaskedLM

    r = _recipe(tmp_path / "cmp", bert_dir, train_file=str(conll_file))
    r["compare"] = {"modes": ["frozen", "lora"]}
    result = toolkit.compare(r)
    assert [row["mode"] for row in result.rows] == ["frozen", "lora"]
    assert all(row["test_f1"] is not None for row in result.rows) and "| test F1 |" in result.table
    frozen = AutoModelForTokenClassification.from_pretrained(tmp_path / "cmp" / "frozen")
    base = BertForMaskedLM.from_pretrained(bert_dir).bert.state_dict()
    for name, value in frozen.bert.state_dict().items():
        assert torch.equal(value, base[name]), name  # the encoder did not move
    assert (tmp_path / "cmp" / "lora" / "adapter_config.json").is_file()
    lora = PeftModel.from_pretrained(
        AutoModelForTokenClassification.from_pretrained(bert_dir, config=frozen.config), tmp_path / "cmp" / "lora"
    )
    assert any("lora_A" in n for n, _ in lora.named_parameters())


def test_ptuning_adapter_tags_words_not_virtual_tokens(tmp_path, bert_dir, conll_file):
    r = _recipe(tmp_path / "pt", bert_dir, train_file=str(conll_file))
    r["finetune"] = {"mode": "ptuning", "num_virtual_tokens": 4}
    result = toolkit.finetune(r)
    assert (result.output_dir / "adapter_config.json").is_file() and 0 <= result.metrics["test_f1"] <= 1
    path, scores = toolkit.predict(result.output_dir, str(conll_file), tmp_path / "tags.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert all(len(r["predictions"]) == len(r["tokens"]) for r in rows) and 0 <= scores["token_accuracy"] <= 1


def test_cli_help_lists_the_task_types():
    from conftest import run_cli

    from toolkit.finetuning.types import TASK_TYPES

    proc = run_cli("finetune", "--help")
    assert proc.returncode == 0 and all(t in proc.stdout for t in TASK_TYPES) and "movie-dialog" in proc.stdout


def test_resumed_generation_with_packing_equals_an_uninterrupted_run(tmp_path, gpt_dir):
    import shutil

    from toolkit.engine.tracking import read_metrics

    path = tmp_path / "pairs.csv"
    rng = random.Random(3)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["prompt", "response"])
        writer.writerows([(f"where is {rng.choice(NAMES)}?", f"in {rng.choice(PLACES)}") for _ in range(40)])
    r = _recipe(tmp_path / "run", gpt_dir, train_file=str(path), max_seq_length=32, packing=True, max_new_tokens=2)
    r["training"].update(num_train_epochs=4, per_device_train_batch_size=2, save_steps=4, save_total_limit=3)
    straight = toolkit.finetune(r).metrics
    losses = [m["loss"] for m in read_metrics(tmp_path / "run") if "loss" in m]
    steps = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert len(steps) >= 2 and len(losses) >= 6
    shutil.rmtree(tmp_path / "run" / "checkpoints" / f"checkpoint-{steps[-1]}")  # a crash after the one before
    resumed = toolkit.finetune(r, training__resume_from_checkpoint="auto").metrics
    assert [m["loss"] for m in read_metrics(tmp_path / "run") if "loss" in m] == pytest.approx(losses, abs=1e-6)
    assert resumed["test_perplexity"] == pytest.approx(straight["test_perplexity"], rel=1e-6)


def test_built_in_movie_dialog_reads_statement_reply_pairs(gpt_dir):
    from transformers import AutoTokenizer

    from toolkit.finetuning.types import load_any

    task = TaskArgs(
        name="movie-dialog", max_seq_length=32, max_train_samples=50, max_eval_samples=10, max_test_samples=10
    )
    kind, plugin, data = load_any(task, AutoTokenizer.from_pretrained(gpt_dir))
    assert kind == "generation" and data.rows == {"train": 50, "validation": 10, "test": 10}
    row = data.raw["train"][0]
    assert row["prompt"] and row["response"]  # statement -> reply, both non-empty
    assert all(-100 in labels[:1] for labels in data.train["labels"])  # the statement carries no loss


def test_qlora_question_answering_keeps_the_span_head_in_full_precision_and_predicts(tmp_path, bert_dir):
    squad = _squad(tmp_path / "squad.json", random.Random(4))
    r = _recipe(tmp_path / "qlora", bert_dir, train_file=str(squad), max_seq_length=32, doc_stride=8)
    r["finetune"] = {"mode": "qlora"}
    result = toolkit.finetune(r)
    heads = [m for n, m in result.model.named_modules() if n.endswith("qa_outputs.modules_to_save.default")]
    assert heads and heads[0].weight.dtype == torch.float32 and heads[0].weight.requires_grad
    path, scores = toolkit.predict(result.output_dir, str(squad), tmp_path / "answers.jsonl")
    assert len(path.read_text().splitlines()) == 30 and 0 <= scores["exact_match"] <= 100


# ---- several processes ----------------------------------------------------------------------------
# Two processes with batch 4 train like one with batch 8 (dropout off): the same losses, metrics, final
# weights and test predictions (each window evaluated once: a window dropped or counted twice would change
# the predictions of its sentence or question). The new types share one launch per configuration.

TYPE_KINDS = ("token_classification", "question_answering", "generation")


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory, bert_dir, gpt_dir, conll_file):
    """(folder, recipe per type, output folder of its one-process run with a global batch of 8)."""
    root = tmp_path_factory.mktemp("types-launch")
    squad = _squad(root / "squad.json", random.Random(6))
    rng = random.Random(7)
    pairs = root / "pairs.csv"
    with pairs.open("w", newline="") as fh:
        rows = [(f"where is {rng.choice(NAMES)}?", f"in {rng.choice(PLACES)}") for _ in range(40)]
        csv.writer(fh).writerows([("prompt", "response"), *rows])
    recipes = {
        "token_classification": _recipe("unused", bert_dir, train_file=str(conll_file)),
        "question_answering": _recipe("unused", bert_dir, train_file=str(squad), max_seq_length=32, doc_stride=8),
        "generation": _recipe(
            "unused", gpt_dir, train_file=str(pairs), max_seq_length=32, packing=True, max_new_tokens=3
        ),
    }
    for r in recipes.values():
        r["training"].update(num_train_epochs=3, per_device_eval_batch_size=5)
    recipes["generation"]["training"]["num_train_epochs"] = 5  # one step per epoch (8 packed rows)
    for kind, r in recipes.items():
        toolkit.finetune(r, output_dir=str(root / "one" / kind))
    return root, recipes


def _launch(root, recipes: dict, name: str, launch_args: list[str], port: int, cpu: bool = True):
    """`accelerate launch LAUNCH_ARGS tests/finetune_each.py` on every recipe with batch 4 per process."""
    import shutil
    import subprocess
    import sys

    import yaml
    from conftest import REPO

    paths = []
    for kind, r in recipes.items():
        r = json.loads(json.dumps(r))
        r["output_dir"] = str(root / name / kind)
        r["training"]["per_device_train_batch_size"] = 4
        paths.append(root / f"{name}-{kind}.yaml")
        paths[-1].write_text(yaml.safe_dump(r))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("ACCELERATE_USE_CPU", None)
    if cpu:
        env["ACCELERATE_USE_CPU"] = "1"
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    cmd = [accelerate, "launch", *launch_args, "--num_processes", "2", "--num_machines", "1"]
    cmd += ["--main_process_port", str(port), "tests/finetune_each.py", *map(str, paths)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def _assert_same_run(one, other, engine: str) -> None:
    from safetensors.torch import load_file

    from toolkit.engine.checkpoint import complete_checkpoints, read_state
    from toolkit.engine.tracking import read_metrics

    state = read_state(complete_checkpoints(other)[-1][1])
    assert state["world_size"] == 2 and state["engine"] == engine
    a, b = (json.loads((d / "results.json").read_text()) for d in (one, other))
    assert a["world_size"] == 1 and b["world_size"] == 2
    losses = [[m["loss"] for m in read_metrics(d) if "loss" in m] for d in (one, other)]
    assert len(losses[0]) >= 5 and losses[1] == pytest.approx(losses[0], abs=1e-5)
    shared = [k for k in a if k.startswith(("eval_", "test_")) and isinstance(a[k], float) and k != "eval_runtime"]
    assert "eval_loss" in shared and "test_loss" in shared
    for key in shared:
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-4), key
    # each test window predicted once, in order (a window dropped or evaluated twice changes its row)
    assert (other / "test_predictions.jsonl").read_text() == (one / "test_predictions.jsonl").read_text()
    weights = [load_file(str(d / "model.safetensors")) for d in (one, other)]
    assert weights[0].keys() == weights[1].keys()
    if json.loads((one / "toolkit_task.json").read_text())["task_type"] != "question_answering":
        # Adam moves a weight by at most about the learning rate per step, so where a gradient is ~0 the
        # processes' different summation order can show up to that much; a real difference shows on average.
        import yaml

        bound = yaml.safe_load((one / "recipe.yaml").read_text())["training"]["learning_rate"] * a["steps"]
        for key, value in weights[0].items():
            diff = (weights[1][key] - value).abs()
            assert diff.max() <= max(bound, 1e-5) and diff.mean() <= 1e-6, (key, diff.max(), diff.mean())
        return
    # The span head's bias (and the last LayerNorm's bias, through the head) moves every position's score
    # alike, so its gradient is zero in exact arithmetic and Adam turns rounding noise there into steps of
    # up to the learning rate. What the model computes from its scores is their softmax: compare that.
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(one)
    batch = tokenizer(["where does the lord live?"], ["the king spoke to lord anna in norway ."], return_tensors="pt")
    spans = []
    for d in (one, other):
        with torch.no_grad():
            out = AutoModelForQuestionAnswering.from_pretrained(d).eval()(**batch)
        spans.append(torch.cat([out.start_logits.softmax(-1), out.end_logits.softmax(-1)]))
    assert torch.allclose(spans[0], spans[1], atol=1e-5)
    for key, value in weights[0].items():
        if not key.endswith("bias"):
            assert torch.allclose(weights[1][key], value, atol=1e-5), key


@pytest.mark.multiproc
def test_two_processes_train_every_new_type_like_one_process_with_the_same_global_batch(one_process_runs):
    root, recipes = one_process_runs
    run = _launch(root, recipes, "ddp", ["--multi_gpu"], port=29561)
    assert run.returncode == 0, run.stderr[-3000:]
    for kind in TYPE_KINDS:
        _assert_same_run(root / "one" / kind, root / "ddp" / kind, "ddp")


@pytest.mark.slow  # DeepSpeed's start-up (and its shared-memory collective's first compile)
@pytest.mark.multiproc
def test_deepspeed_zero2_trains_every_new_type_like_one_process(one_process_runs):
    root, recipes = one_process_runs
    config = ["--config_file", "recipes/accelerate/deepspeed-zero2.yaml"]
    run = _launch(root, recipes, "zero2", config, port=29562, cpu=False)
    assert run.returncode == 0, run.stderr[-3000:]
    for kind in TYPE_KINDS:
        _assert_same_run(root / "one" / kind, root / "zero2" / kind, "deepspeed-zero2")
