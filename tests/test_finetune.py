"""Fine-tuning modes on tiny toolkit-pretrained checkpoints: which weights train, reloads with plain
transformers/peft give the same logits, labels and text pairs, bad input, predict and compare."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch
from conftest import FILLER, GOOD, REPO, labelled_sentence, run_cli, tiny_bert_recipe, tiny_gpt_recipe

import toolkit
from toolkit.cli import main as cli_main
from toolkit.engine.tracking import read_metrics
from toolkit.errors import ToolkitError
from toolkit.finetuning import modes as modes_module


def _write_csv(path: Path, header: list[str], rows: list) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """Labelled files: sentiment with string labels, a text-pair task, a regression task."""
    out = tmp_path_factory.mktemp("labelled")
    rng = random.Random(0)
    rows = [(labelled_sentence(rng, i % 2), "pos" if i % 2 else "neg") for i in range(64)]
    _write_csv(out / "sentiment.csv", ["text", "label"], rows)
    pairs = []
    for i in range(48):
        a = labelled_sentence(rng, i % 2)
        b = a if i % 3 else labelled_sentence(rng, 1 - i % 2)
        pairs.append((a, b, "same" if a == b else "different"))
    _write_csv(out / "pairs.csv", ["premise", "hypothesis", "relation"], pairs)
    scores = []
    for _ in range(48):
        n = rng.randint(0, 3)
        words = rng.choices(GOOD, k=n) + rng.choices(FILLER, k=6 - n)
        rng.shuffle(words)
        scores.append((" ".join(words), n + rng.random() * 0.5))
    _write_csv(out / "scores.csv", ["sentence", "score"], scores)
    return out


@pytest.fixture(scope="session")
def bert_ckpt(tmp_path_factory, corpus_dir, wordpiece_dir) -> Path:
    """The toolkit's own (tiny) BERT: an MLM checkpoint without pooler or classifier."""
    out = tmp_path_factory.mktemp("ckpt") / "bert"
    toolkit.pretrain(tiny_bert_recipe(out, corpus_dir, wordpiece_dir, max_steps=2, eval_on_start=False))
    return out


@pytest.fixture(scope="session")
def gpt_ckpt(tmp_path_factory, corpus_dir, bpe_dir) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "gpt"
    toolkit.pretrain(tiny_gpt_recipe(out, corpus_dir, bpe_dir, max_steps=2, eval_on_start=False))
    return out


@pytest.fixture(scope="session")
def electra_ckpt(tmp_path_factory, wordpiece_dir) -> Path:
    """An ELECTRA discriminator folder (as ELECTRA pretraining writes it) with the toolkit's tokenizer."""
    from transformers import AutoTokenizer, ElectraConfig, ElectraForPreTraining

    out = tmp_path_factory.mktemp("ckpt") / "electra"
    tokenizer = AutoTokenizer.from_pretrained(wordpiece_dir)
    config = ElectraConfig(
        vocab_size=len(tokenizer),
        embedding_size=64,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    ElectraForPreTraining(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def recipe(out, model, train_file, mode="full", text_fields=("text",), label_field="label", **training) -> dict:
    return {
        "output_dir": str(out),
        "model": {"model_name_or_path": str(model)},
        "task": {
            "train_file": str(train_file),
            "text_fields": list(text_fields),
            "label_field": label_field,
            "max_seq_length": 32,
            "validation_split": 0.25,
            "test_split": 0.25,
        },
        "finetune": {"mode": mode, "num_virtual_tokens": 4},
        "training": {
            "num_train_epochs": 2,
            "per_device_train_batch_size": 8,
            "per_device_eval_batch_size": 16,
            "logging_steps": 2,
            "seed": 0,
            **training,
        },
    }


def _snapshot_build(monkeypatch) -> dict:
    """Record every parameter right after the model is built for its mode (before training)."""
    seen: dict = {}
    build = modes_module.build

    def spy(*args, **kwargs):
        built = build(*args, **kwargs)
        seen.update({n: p.detach().clone() for n, p in built.model.named_parameters()})
        seen["__trainable__"] = {n for n, p in built.model.named_parameters() if p.requires_grad}
        return built

    monkeypatch.setattr(modes_module, "build", spy)
    return seen


def _changed(before: dict, model) -> tuple[set, set]:
    changed, same = set(), set()
    for name, p in model.named_parameters():
        (same if torch.equal(before[name], p.detach().to(before[name].dtype)) else changed).add(name)
    return changed, same


def _batch(tokenizer, texts, pairs=None):
    return tokenizer(texts, pairs, padding=True, return_tensors="pt")


TEXTS = ["good noble king of denmark", "foul and cruel lord spoke", "the queen"]


# ---- frozen ---------------------------------------------------------------------------------------


def test_frozen_keeps_the_encoder_bit_identical_and_reloads_with_plain_transformers(
    tmp_path, bert_ckpt, data_dir, monkeypatch
):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    before = _snapshot_build(monkeypatch)
    result = toolkit.finetune(recipe(tmp_path / "frozen", bert_ckpt, data_dir / "sentiment.csv", "frozen"))
    model = result.model.eval()
    changed, same = _changed(before, model)
    head = {n for n in before if n.startswith(("classifier.", "bert.pooler."))}
    assert before["__trainable__"] == head
    assert changed and changed <= head  # only the head moved...
    assert {n for n in before if n.startswith(("bert.embeddings.", "bert.encoder."))} <= same  # ...never the encoder
    pretrained = load_file(bert_ckpt / "model.safetensors")
    for name, p in model.named_parameters():
        if name.startswith(("bert.embeddings.", "bert.encoder.")):
            assert torch.equal(p, pretrained[name]), name  # bit-identical to the checkpoint

    out = result.output_dir
    assert {"config.json", "model.safetensors", "recipe.yaml", "README.md", "results.json", "metrics.jsonl"} <= {
        p.name for p in out.iterdir()
    }
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    reloaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    batch = _batch(AutoTokenizer.from_pretrained(out), TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, rtol=0, atol=1e-5)
    assert reloaded.config.id2label == {0: "neg", 1: "pos"}  # string labels round-trip
    assert result.metrics["feature_seconds"] >= 0 and "test_macro_f1" in result.metrics

    # The head trained on cached features: a second run reads them from the cache.
    again = toolkit.finetune(recipe(tmp_path / "again", bert_ckpt, data_dir / "sentiment.csv", "frozen"))
    assert again.metrics["test_accuracy"] == pytest.approx(result.metrics["test_accuracy"])


@pytest.mark.parametrize("mode", ["frozen", "full"])
def test_mean_pooling_reloads_through_its_model_code(tmp_path, gpt_ckpt, data_dir, mode):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    r = recipe(tmp_path / "mean", gpt_ckpt, data_dir / "sentiment.csv", mode, num_train_epochs=1)
    r["finetune"]["pooling"] = "mean"
    result = toolkit.finetune(r)
    out = result.output_dir
    assert (out / "toolkit_pooling.py").is_file()
    with pytest.raises(ValueError):  # without trust_remote_code transformers refuses rather than pool wrongly
        AutoModelForSequenceClassification.from_pretrained(out)
    reloaded = AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = _batch(tokenizer, TEXTS)
    mask = batch["attention_mask"].unsqueeze(-1).float()
    with torch.no_grad():
        hidden = result.model.transformer(**batch).last_hidden_state
        expected = result.model.score((hidden * mask).sum(1) / mask.sum(1))
        torch.testing.assert_close(reloaded(**batch).logits, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(result.model.eval()(**batch).logits, expected, rtol=0, atol=1e-5)
        single = reloaded(**_batch(tokenizer, TEXTS[2:])).logits  # padding does not change an example's logits
        torch.testing.assert_close(single, reloaded(**batch).logits[2:], rtol=0, atol=1e-5)


def test_frozen_on_an_electra_discriminator(tmp_path, electra_ckpt, data_dir, monkeypatch):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    before = _snapshot_build(monkeypatch)
    result = toolkit.finetune(recipe(tmp_path / "electra", electra_ckpt, data_dir / "sentiment.csv", "frozen"))
    changed, same = _changed(before, result.model)
    assert changed and all(n.startswith("classifier.") for n in changed)
    encoder = [n for n in before if n.startswith("electra.")]
    assert encoder and all(n in same for n in encoder)
    reloaded = AutoModelForSequenceClassification.from_pretrained(result.output_dir).eval()
    batch = _batch(AutoTokenizer.from_pretrained(result.output_dir), TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, result.model.eval()(**batch).logits, rtol=0, atol=1e-5)


# ---- full -----------------------------------------------------------------------------------------


def test_full_fine_tuning_learns_and_reloads(tmp_path, bert_ckpt, data_dir, monkeypatch):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    before = _snapshot_build(monkeypatch)
    # the toy sentences' length gives the label away (this tokenizer cuts the negative words into more
    # pieces: 13.2 against 11.8 tokens), so length-grouped batches would each hold mostly one class
    r = recipe(
        tmp_path / "full",
        bert_ckpt,
        data_dir / "sentiment.csv",
        "full",
        num_train_epochs=5,
        eval_steps=8,
        group_by_length=False,
    )
    r["training"]["learning_rate"] = 2e-3
    result = toolkit.finetune(r)
    changed, _ = _changed(before, result.model)
    assert {n for n in before if n.startswith("bert.encoder.")} <= changed  # every layer trained
    m = result.metrics
    assert m["eval_accuracy"] >= 0.75 and m["eval_loss"] < m["initial_eval_loss"]
    assert m["test_accuracy"] >= 0.75
    evals = [e for e in read_metrics(result.output_dir) if "eval_accuracy" in e]
    assert len(evals) >= 3 and all("train_seconds" in e for e in evals[1:])

    reloaded = AutoModelForSequenceClassification.from_pretrained(result.output_dir).eval()
    batch = _batch(AutoTokenizer.from_pretrained(result.output_dir), TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, result.model.eval()(**batch).logits, rtol=0, atol=1e-5)
    with (result.output_dir / "test_predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 16 and {r["prediction"] for r in rows} <= {"neg", "pos"} and "p_pos" in rows[0]


def test_resumed_fine_tuning_equals_an_uninterrupted_run(tmp_path, bert_ckpt, data_dir):
    import shutil

    r = recipe(tmp_path / "run", bert_ckpt, data_dir / "sentiment.csv", "lora", save_steps=4, save_total_limit=3)
    straight = toolkit.finetune(r).metrics
    losses = [m["loss"] for m in read_metrics(tmp_path / "run") if "loss" in m]
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "checkpoint-8")  # a crash after step 4
    resumed = toolkit.finetune(r, training__resume_from_checkpoint="auto").metrics
    assert [m["loss"] for m in read_metrics(tmp_path / "run") if "loss" in m] == pytest.approx(losses, abs=1e-6)
    assert resumed["test_loss"] == pytest.approx(straight["test_loss"], abs=1e-6)


def test_full_with_layerwise_decay_gives_lower_layers_smaller_rates(bert_ckpt, data_dir, tmp_path):
    from toolkit.config import resolve
    from toolkit.engine.optim import make_optimizer
    from toolkit.finetuning.config import FinetuneRecipe
    from toolkit.finetuning.objective import SequenceClassifier, layer_depth

    r = resolve(
        FinetuneRecipe,
        recipe(tmp_path / "x", bert_ckpt, data_dir / "sentiment.csv", "full"),
        finetune__layerwise_lr_decay=0.5,
    )
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(bert_ckpt, num_labels=2)
    opt = make_optimizer(SequenceClassifier(model, r.finetune, "classification", 0), r.training, torch.device("cpu"))
    rates = {}
    for group in opt.param_groups:
        for p in group["params"]:
            name = next(n for n, q in model.named_parameters() if q is p)
            rates[name] = group["lr"]
    lr = r.training.learning_rate
    assert rates["classifier.weight"] == pytest.approx(lr)
    assert rates["bert.encoder.layer.1.attention.self.query.weight"] == pytest.approx(lr * 0.5)  # top layer
    assert rates["bert.encoder.layer.0.attention.self.query.weight"] == pytest.approx(lr * 0.25)
    assert rates["bert.embeddings.word_embeddings.weight"] == pytest.approx(lr * 0.125)
    assert layer_depth("transformer.h.3.attn.c_attn.weight", 4) == 4  # GPT-2 layer names


def test_gpt_full_gets_a_pad_token_and_batches_like_single_examples(tmp_path, gpt_ckpt, data_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    result = toolkit.finetune(recipe(tmp_path / "gpt", gpt_ckpt, data_dir / "sentiment.csv", "full"))
    reloaded = AutoModelForSequenceClassification.from_pretrained(result.output_dir).eval()
    assert reloaded.config.pad_token_id is not None
    tokenizer = AutoTokenizer.from_pretrained(result.output_dir)
    batch = _batch(tokenizer, TEXTS)
    with torch.no_grad():
        logits = reloaded(**batch).logits
        torch.testing.assert_close(logits, result.model.eval()(**batch).logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(reloaded(**_batch(tokenizer, TEXTS[2:])).logits, logits[2:], rtol=0, atol=1e-5)


# ---- PEFT modes -----------------------------------------------------------------------------------

PEFT_TRAINED = {  # what may change besides the head copy PEFT trains (`modules_to_save`)
    "prompt": ("prompt_encoder.",),
    "prefix": ("prompt_encoder.",),
    "ptuning": ("prompt_encoder.",),
    "lora": ("lora_A.", "lora_B."),
    "qlora": ("lora_A.", "lora_B."),
}


def _load_adapter(out: Path, mode: str):
    """The plain peft way: the recorded base, with the saved classification config, plus the adapter."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification, BitsAndBytesConfig

    from toolkit.finetuning.modes import QLORA_SKIP_MODULES
    from toolkit.finetuning.prefix import support_prefix_tuning

    kwargs = {}
    if mode == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
            llm_int8_skip_modules=QLORA_SKIP_MODULES,
        )
        kwargs["device_map"] = "cpu"
    base = AutoModelForSequenceClassification.from_pretrained(
        PeftConfig.from_pretrained(out).base_model_name_or_path, config=AutoConfig.from_pretrained(out), **kwargs
    )
    model = PeftModel.from_pretrained(base, out)
    return (support_prefix_tuning(model) if mode == "prefix" else model).eval()


@pytest.mark.parametrize("mode", ["prompt", "prefix", "ptuning", "lora", "qlora"])
def test_peft_modes_train_only_peft_weights_and_the_head_and_reload(tmp_path, bert_ckpt, data_dir, mode, monkeypatch):
    from transformers import AutoTokenizer

    before = _snapshot_build(monkeypatch)
    r = recipe(tmp_path / mode, bert_ckpt, data_dir / "sentiment.csv", mode, num_train_epochs=1)
    result = toolkit.finetune(r)
    model = result.model.eval()
    changed, same = _changed(before, model)
    trainable = before["__trainable__"]
    allowed = PEFT_TRAINED[mode] + ("modules_to_save.",)
    assert trainable and all(any(a in n for a in allowed) for n in trainable)
    assert changed and changed <= trainable
    assert any(any(a in n for a in PEFT_TRAINED[mode]) for n in changed)  # the PEFT weights themselves moved
    assert any("modules_to_save." in n and "classifier" in n for n in changed)  # and the head
    base = [n for n in before if n != "__trainable__" and n not in trainable]
    assert base and all(n in same for n in base)  # the base weights (and the head's original copy) did not

    out = result.output_dir
    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "config.json", "README.md", "recipe.yaml"} <= files
    assert "model.safetensors" not in files
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(bert_ckpt.resolve())
    reloaded = _load_adapter(out, mode)
    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = _batch(tokenizer, TEXTS)
    with torch.no_grad():
        logits = reloaded(**batch).logits
        torch.testing.assert_close(logits, model(**batch).logits, rtol=0, atol=1e-5)
        single = reloaded(**_batch(tokenizer, TEXTS[2:])).logits
        torch.testing.assert_close(single, logits[2:], rtol=0, atol=1e-4)  # padding-independent
    assert reloaded.config.id2label == {0: "neg", 1: "pos"}


def test_prompt_text_initialisation_starts_from_the_words_embeddings(tmp_path, bert_ckpt, data_dir):
    from toolkit.config import resolve
    from toolkit.finetuning.config import FinetuneRecipe
    from toolkit.finetuning.modes import build
    from toolkit.finetuning.tasks import load_task
    from toolkit.tokenizer import load_model_tokenizer

    r = resolve(
        FinetuneRecipe,
        recipe(tmp_path / "t", bert_ckpt, data_dir / "sentiment.csv", "prompt"),
        finetune__prompt_init="text",
    )
    tokenizer = load_model_tokenizer(str(bert_ckpt))
    data = load_task(r.task, tokenizer)
    built = build(r, data, tokenizer, str(bert_ckpt), torch.device("cpu"))
    prompt = built.model.prompt_encoder["default"].embedding.weight
    ids = tokenizer("Classify the text as neg or pos:")["input_ids"]  # as PEFT tokenizes it: [CLS] classify ...
    words = built.base.bert.embeddings.word_embeddings.weight[ids]
    assert prompt.shape[0] == 4 and torch.equal(prompt, words[:4])


def test_prefix_fix_reaches_the_attention_and_keeps_token_positions(bert_ckpt):
    """transformers 5 + PEFT prefix tuning on BERT: with the fix the prefix is attended to (it changes
    the logits) and the real tokens take PEFT's positions, after the 3 virtual tokens."""
    import peft
    from transformers import AutoModelForSequenceClassification

    from toolkit.finetuning.prefix import support_prefix_tuning

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(bert_ckpt, num_labels=2).eval()
    ids = torch.tensor([[2, 40, 41, 42, 3]])
    with torch.no_grad():
        plain = base(input_ids=ids).logits
    model = peft.get_peft_model(
        support_prefix_tuning(base), peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3)
    ).eval()
    positions = []
    hook = base.bert.embeddings.position_embeddings.register_forward_hook(
        lambda m, args, out: positions.append(args[0])
    )
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.normal_()
        prefixed = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    hook.remove()
    assert not torch.allclose(prefixed, plain)
    assert positions[0].flatten().tolist() == [3, 4, 5, 6, 7]
    assert support_prefix_tuning(model) is model  # idempotent


def test_gpt_prompt_tuning_reloads(tmp_path, gpt_ckpt, data_dir):
    from transformers import AutoTokenizer

    result = toolkit.finetune(
        recipe(tmp_path / "gp", gpt_ckpt, data_dir / "sentiment.csv", "prompt", num_train_epochs=1)
    )
    reloaded = _load_adapter(result.output_dir, "prompt")
    tokenizer = AutoTokenizer.from_pretrained(result.output_dir)
    batch = tokenizer(TEXTS, padding="max_length", max_length=32, return_tensors="pt")  # as trained: fixed length
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, result.model.eval()(**batch).logits, rtol=0, atol=1e-5)


# ---- task data ------------------------------------------------------------------------------------


def test_text_pair_task_uses_both_segments(tmp_path, bert_ckpt, data_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    r = recipe(tmp_path / "pair", bert_ckpt, data_dir / "pairs.csv", "lora", ("premise", "hypothesis"), "relation")
    result = toolkit.finetune(r)
    assert result.model.config.id2label == {0: "different", 1: "same"}
    tokenizer = AutoTokenizer.from_pretrained(result.output_dir)
    batch = _batch(tokenizer, TEXTS, TEXTS[::-1])
    assert batch["token_type_ids"].max() == 1  # [CLS] a [SEP] b [SEP], b in segment 1
    with torch.no_grad():
        a = result.model.eval()(**batch).logits
        b = result.model(**{**batch, "token_type_ids": torch.zeros_like(batch["token_type_ids"])}).logits
    assert not torch.allclose(a, b)  # the segment embedding is used
    with (result.output_dir / "test_predictions.csv").open() as fh:
        assert next(csv.reader(fh))[:3] == ["premise", "hypothesis", "label"]
    del AutoModelForSequenceClassification


def test_regression_reports_correlations(tmp_path, bert_ckpt, data_dir):
    r = recipe(tmp_path / "reg", bert_ckpt, data_dir / "scores.csv", "full", ("sentence",), "score")
    result = toolkit.finetune(r)
    assert result.model.config.problem_type == "regression" and result.model.config.num_labels == 1
    assert {"test_pearson", "test_spearman", "test_mse", "eval_pearson"} <= set(result.metrics)


def test_splits_are_stratified_and_datasets_folders_and_jsonl_load(tmp_path):
    import datasets

    from toolkit.finetuning.config import TaskArgs
    from toolkit.finetuning.tasks import load_task

    data = load_task(TaskArgs(name="sms-spam"))
    share = {s: sum(getattr(data, s)["labels"]) / data.rows[s] for s in ("train", "validation", "test")}
    assert data.labels == ["ham", "spam"] and max(share.values()) - min(share.values()) < 0.01
    assert sum(data.rows.values()) == 4837

    rows = [{"review": f"text {i}", "stars": i % 3 + 1} for i in range(30)]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:6])})
    dd.save_to_disk(str(tmp_path / "dd"))
    loaded = load_task(TaskArgs(train_file=str(tmp_path / "dd"), text_fields=["review"], label_field="stars"))
    assert loaded.labels == ["1", "2", "3"] and loaded.rows["test"] == 6  # the folder's own test split
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "rows.parquet"))
    loaded = load_task(
        TaskArgs(train_file=str(tmp_path / "rows.parquet"), text_fields=["review"], label_field="stars", test_split=0)
    )
    assert loaded.test is None and loaded.rows == {"train": 27, "validation": 3}
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_task(
        TaskArgs(train_file=str(tmp_path / "rows.jsonl"), text_fields=["review"], label_field="stars", labels=[3, 2, 1])
    )
    assert loaded.labels == ["3", "2", "1"]  # task.labels fixes the id order


# ---- bad input ------------------------------------------------------------------------------------


def _bad(tmp_path, bert_ckpt, train, **task) -> dict:
    r = recipe(tmp_path / "bad", bert_ckpt, train)
    r["task"].update(task)
    return r


@pytest.mark.parametrize(
    "case, message",
    [
        ("label_field", "no column 'sentiment' in"),
        ("text_field", "no column 'review' in"),
        ("one_class", "only one class ('pos')"),
        ("empty_split", "the validation split is empty"),
        ("unknown_mode", "unknown finetune.mode 'lorra' (did you mean 'lora'?)"),
        ("unseen_label", "label values that training never saw: 'maybe' (2 rows)"),
    ],
)
def test_bad_input_stops_before_training_with_a_clear_message(tmp_path, bert_ckpt, data_dir, case, message, capsys):
    import yaml

    good = data_dir / "sentiment.csv"
    rows = list(csv.reader(good.open()))[1:]
    if case == "label_field":
        r = _bad(tmp_path, bert_ckpt, good, label_field="sentiment")
    elif case == "text_field":
        r = _bad(tmp_path, bert_ckpt, good, text_fields=["review"])
    elif case == "one_class":
        r = _bad(
            tmp_path, bert_ckpt, _write_csv(tmp_path / "one.csv", ["text", "label"], [(t, "pos") for t, _ in rows])
        )
    elif case == "empty_split":
        empty = _write_csv(tmp_path / "empty.csv", ["text", "label"], [])
        r = _bad(tmp_path, bert_ckpt, good, validation_file=str(empty))
    elif case == "unknown_mode":
        r = _bad(tmp_path, bert_ckpt, good)
        r["finetune"]["mode"] = "lorra"
    else:
        test = _write_csv(tmp_path / "test.csv", ["text", "label"], [*rows[:4], ("a b", "maybe"), ("c d", "maybe")])
        r = _bad(tmp_path, bert_ckpt, good, test_file=str(test))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(r))
    assert cli_main(["finetune", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    if case in ("label_field", "text_field"):
        assert "its columns are text, label" in err
    assert not (tmp_path / "bad").exists()  # nothing written
    with pytest.raises(ToolkitError):
        toolkit.finetune(r)


def test_cli_reports_bad_input_with_exit_status_2(tmp_path, bert_ckpt):
    proc = run_cli(
        "finetune",
        str(REPO / "recipes" / "finetune-full.yaml"),
        f"model.model_name_or_path={bert_ckpt}",
        "task.name=null",
        f"task.train_file={tmp_path / 'missing.csv'}",
    )
    assert proc.returncode == 2 and "task.train_file: file not found" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---- predict and compare --------------------------------------------------------------------------


def test_predict_writes_a_row_per_example_and_scores_labelled_files(tmp_path, bert_ckpt, data_dir, capsys):
    result = toolkit.finetune(
        recipe(tmp_path / "lora", bert_ckpt, data_dir / "sentiment.csv", "lora", num_train_epochs=1)
    )
    out = tmp_path / "preds.csv"
    assert cli_main(["predict", str(result.output_dir), str(data_dir / "sentiment.csv"), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "predictions written to" in printed and '"accuracy"' in printed
    with out.open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 64 and set(rows[0]) == {"text", "label", "prediction", "p_neg", "p_pos"}
    assert {r["prediction"] for r in rows} <= {"neg", "pos"}
    path, scores = toolkit.predict(result.output_dir, str(data_dir / "sentiment.csv"), tmp_path / "p.jsonl")
    first = json.loads(path.read_text().splitlines()[0])
    assert first["prediction"] == rows[0]["prediction"] and scores["accuracy"] == pytest.approx(
        json.loads(printed[printed.index("{") :])["accuracy"]
    )


def test_compare_runs_each_mode_and_writes_table_csv_and_plot(tmp_path, bert_ckpt, data_dir):
    r = recipe(tmp_path / "cmp", bert_ckpt, data_dir / "sentiment.csv", num_train_epochs=1, eval_steps=2)
    r["compare"] = {
        "modes": ["frozen", "full", "prompt"],
        "mode_overrides": {"frozen": {"training.num_train_epochs": 3}},
    }
    result = toolkit.compare(r)
    assert [row["mode"] for row in result.rows] == ["frozen", "full", "prompt"]
    assert result.results["frozen"].metrics["epochs"] == pytest.approx(3)
    assert result.results["full"].metrics["epochs"] == pytest.approx(1)
    full, prompt = result.rows[1], result.rows[2]
    assert full["trainable_percent"] == pytest.approx(100) and prompt["trainable_percent"] < 10
    assert prompt["weights_mb"] < full["weights_mb"]
    assert all(row["peak_memory_mib"] >= 0 and row["train_seconds_per_epoch"] > 0 for row in result.rows)
    assert result.markdown.read_text().count("\n| ") >= 4 and "| test accuracy |" in result.table
    with result.csv.open() as fh:
        assert len(list(csv.DictReader(fh))) == 3
    assert result.plot.stat().st_size > 1000
    kinds = {"frozen": "frozen encoder", "full": "full fine-tuning", "prompt": "PEFT prompt tuning"}
    for mode, kind in kinds.items():  # each mode's own model card, not just a file of that name
        card = (tmp_path / "cmp" / mode / "README.md").read_text()
        assert card.startswith(f"# {mode}\n") and kind in card and "| accuracy |" in card


def test_compare_rejects_overrides_that_break_the_comparison(tmp_path, bert_ckpt, data_dir):
    r = recipe(tmp_path / "cmp", bert_ckpt, data_dir / "sentiment.csv")
    r["compare"] = {"modes": ["frozen", "full"], "mode_overrides": {"full": {"training.seed": 3}}}
    with pytest.raises(ToolkitError, match="share the model, task, seed"):
        toolkit.compare(r)


# ---- recipes and CLI ------------------------------------------------------------------------------


def test_every_shipped_finetune_recipe_validates_and_keeps_machine_paths_out():
    from toolkit.config import resolve
    from toolkit.finetuning.compare import mode_recipes
    from toolkit.finetuning.config import FinetuneRecipe

    found = sorted((REPO / "recipes").rglob("finetune-*.yaml"))
    names = {p.name for p in found}
    assert {"finetune-frozen.yaml", "finetune-full.yaml", "finetune-prompt.yaml", "finetune-lora.yaml"} <= names
    assert "finetune-compare.yaml" in names
    for path in found:
        r = resolve(FinetuneRecipe, path)
        # an installed package's model, or the output of a shipped recipe (finetune-chat: gpt-clm's)
        assert r.model.model_name_or_path.startswith(("pkg://", "outputs/")) and r.output_dir.startswith("outputs/")
        mode_recipes(path)


def test_dry_runs_print_the_resolved_recipes(capsys):
    assert (
        cli_main(["finetune", str(REPO / "recipes" / "finetune-prompt.yaml"), "finetune.mode=prefix", "--dry-run"]) == 0
    )
    printed = capsys.readouterr().out
    assert "mode: prefix" in printed and "learning_rate: 0.03" in printed  # the recipe's rate wins over the mode's
    assert cli_main(["compare", str(REPO / "recipes" / "finetune-compare.yaml"), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("# ---- mode ") == 3
    assert [line.strip() for line in printed.splitlines() if line.startswith("  learning_rate:")] == [
        "learning_rate: 0.001",
        "learning_rate: 0.0001",
        "learning_rate: 0.03",
    ]
    assert printed.count("\n  pooling: mean") == 1  # only the frozen mode's override


def test_cli_help_lists_modes_and_built_in_tasks():
    from toolkit.finetuning.config import MODES
    from toolkit.finetuning.tasks import BUILTIN_TASKS

    for command in ("finetune", "predict", "compare"):
        proc = run_cli(command, "--help")
        assert proc.returncode == 0 and "usage: toolkit" in proc.stdout
        if command == "finetune":
            assert all(m in proc.stdout for m in MODES) and all(t in proc.stdout for t in BUILTIN_TASKS)


def test_length_grouped_batches_are_a_seeded_permutation_with_little_padding():
    from toolkit.data.loader import GlobalBatchSampler

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 60, (1000,), generator=g)
    grouped = GlobalBatchSampler(1000, 8, world_size=2, rank=0, seed=1, lengths=lengths)
    other = GlobalBatchSampler(1000, 8, world_size=2, rank=1, seed=1, lengths=lengths)
    plain = GlobalBatchSampler(1000, 8, world_size=2, rank=0, seed=1)
    batches, rest = list(grouped), list(other)
    seen = [i for b in batches + rest for i in b]
    assert len(seen) == len(set(seen)) == 1000 - 1000 % 16  # each example at most once per epoch

    def padding(bs):
        return sum(int(lengths[b].max()) * len(b) - int(lengths[b].sum()) for b in bs)

    assert padding(batches) < padding(list(plain)) / 5
    assert batches == list(GlobalBatchSampler(1000, 8, world_size=2, rank=0, seed=1, lengths=lengths))
    grouped.set_epoch(1)
    assert list(grouped) != batches  # a new grouping each epoch
    grouped.set_epoch(0, start=3)
    assert list(grouped) == batches[3:]  # resume skips batches exactly


def test_compare_of_a_resolved_recipe_trains_each_mode_at_its_own_rate(tmp_path, bert_ckpt, data_dir, monkeypatch):
    """A recipe resolved once (its learning rate derived from its mode) must not pass that rate on to
    the other modes of a comparison: each mode derives its own."""
    from toolkit.config import resolve
    from toolkit.finetuning import pipeline
    from toolkit.finetuning.config import MODE_LEARNING_RATES, FinetuneRecipe

    spec = recipe(tmp_path / "cmp", bert_ckpt, data_dir / "sentiment.csv", "full")
    spec["compare"] = {"modes": ["frozen", "full", "lora"]}
    resolved = resolve(FinetuneRecipe, spec)
    assert resolved.training.learning_rate == MODE_LEARNING_RATES["full"]
    again = resolve(FinetuneRecipe, resolved, ["finetune.mode=lora"])  # re-resolving derives anew
    assert again.training.learning_rate == MODE_LEARNING_RATES["lora"]
    pinned = resolve(FinetuneRecipe, spec, ["training.learning_rate=0.002", "finetune.mode=lora"])
    assert (
        resolve(FinetuneRecipe, pinned, ["finetune.mode=frozen"]).training.learning_rate == 0.002
    )  # a given rate stays

    trained_at = {}

    def fake_run(mode_recipe):  # record what each mode would train with, instead of training
        trained_at[mode_recipe.finetune.mode] = mode_recipe.training.learning_rate
        return pipeline.FinetuneResult(output_dir=Path(mode_recipe.output_dir), metrics={"test_accuracy": 0.5})

    monkeypatch.setattr(pipeline, "run", fake_run)
    result = toolkit.compare(resolved)
    assert trained_at == {"frozen": 1e-3, "full": 3e-5, "lora": 5e-4}
    assert [row["learning_rate"] for row in result.rows] == [1e-3, 3e-5, 5e-4]


def test_validate_checks_without_writing_into_the_recipe(bert_ckpt, data_dir, tmp_path):
    """Derived defaults are filled by the resolver into a new recipe; validate() only checks."""
    from toolkit.config import from_dict
    from toolkit.finetuning.config import FinetuneRecipe

    raw = from_dict(FinetuneRecipe, recipe(tmp_path / "v", bert_ckpt, data_dir / "sentiment.csv", "lora"))
    assert raw.derived_defaults() == {"training.learning_rate": 5e-4}
    with pytest.raises(ToolkitError, match="learning_rate"):
        raw.validate()  # unset and not derived: refused, not filled in place
    assert raw.training.learning_rate is None


def test_own_files_on_the_command_line_replace_the_recipes_built_in_task():
    from toolkit.config import resolve
    from toolkit.finetuning.config import FinetuneRecipe

    shipped = REPO / "recipes" / "finetune-lora.yaml"
    assert resolve(FinetuneRecipe, shipped).task.name == "movie-sentiment"
    mine = resolve(FinetuneRecipe, shipped, ["task.train_file=reviews.csv", "task.label_field=stars"])
    assert mine.task.name is None and mine.task.train_file == "reviews.csv"
    with pytest.raises(ToolkitError, match="brings its own data"):  # both named together is still refused
        resolve(FinetuneRecipe, shipped, ["task.train_file=reviews.csv", "task.name=sms-spam"])
