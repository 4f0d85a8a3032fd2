"""Cloze prompts on causal LMs (finetune.mode=cloze on a GPT-2): label words scored by their
likelihood after the prompt, every token of a word counted (summed, or averaged with
prompt.length_normalize), in-context demonstrations drawn from the training split only, and
`toolkit predict` on the saved folder."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch
from conftest import labelled_sentence

import toolkit
from toolkit.errors import ToolkitError
from toolkit.finetuning import causal
from toolkit.finetuning.cloze import word_pieces

MULTI = "kingsbloodly"  # not a word of the corpus: several BPE pieces


def _write_csv(path: Path, rows: list) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory) -> Path:
    """64 rows, each text unique (it carries its row number), so a prompt's texts can be traced back."""
    rng = random.Random(0)
    rows = [(f"{labelled_sentence(rng, i % 2)} number {i}", "pos" if i % 2 else "neg") for i in range(64)]
    return _write_csv(tmp_path_factory.mktemp("clm-data") / "sentiment.csv", rows)


@pytest.fixture(scope="module")
def tokenizer(bpe_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bpe_dir)


def _tiny_gpt(out: Path, tokenizer, favourite: list[int] | None = None) -> Path:
    """A tiny GPT-2. With `favourite`: its output no longer depends on the input (ln_f's weight is 0,
    its bias a fixed vector), and the untied LM head gives the favourite tokens a logit 100 above
    the rest at every position: a bias towards them."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=256,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_inner=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=favourite is None,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(config)
    if favourite is not None:
        with torch.no_grad():
            model.transformer.ln_f.weight.zero_()
            model.transformer.ln_f.bias.zero_()
            model.transformer.ln_f.bias[0] = 1.0
            model.lm_head.weight.zero_()
            model.lm_head.weight[favourite, 0] = 100.0
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def random_gpt(tmp_path_factory, tokenizer) -> Path:
    return _tiny_gpt(tmp_path_factory.mktemp("gpt") / "random", tokenizer)


def recipe(out, model, train_file, **prompt) -> dict:
    return {
        "output_dir": str(out),
        "model": {"model_name_or_path": str(model)},
        "task": {"train_file": str(train_file), "max_seq_length": 200, "validation_split": 0.25, "test_split": 0.25},
        "finetune": {"mode": "cloze"},
        "prompt": {"template": "{text} it was {mask} .", "verbalizer": {"neg": "foul", "pos": "good"}, **prompt},
        "training": {"num_train_epochs": 0, "per_device_train_batch_size": 8, "per_device_eval_batch_size": 16},
    }


def _predictions(path: Path) -> list[str]:
    with path.open() as fh:
        return [row["prediction"] for row in csv.DictReader(fh)]


# ---- scoring: every token of a label word, summed or averaged ---------------------------------------


@pytest.mark.parametrize("normalize", [False, True])
def test_label_scores_are_the_words_log_likelihood_computed_by_hand(tokenizer, random_gpt, normalize):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(random_gpt).eval()
    words = [[word_pieces(tokenizer, "good")], [word_pieces(tokenizer, MULTI), word_pieces(tokenizer, "foul")]]
    assert len(words[1][0]) >= 3  # the multi-token case is really tested
    # prompts of different lengths: the shorter one is padded, and padding must not change its scores
    prompts = [tokenizer("the king spoke it was", add_special_tokens=False)["input_ids"], list(range(5, 17))]
    ids = torch.zeros(2, 1, 12, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, 0, : len(p)] = torch.tensor(p)
    lengths = torch.tensor([[len(p)] for p in prompts])
    assert lengths[0, 0] < 12
    with torch.no_grad():
        got = causal.label_scores(model, words, ids, lengths, tokenizer.pad_token_id, normalize)

    def by_hand(prompt, word):  # one sequence at a time, no padding: log p(w_i | prompt, w_<i)
        with torch.no_grad():
            logp = model(torch.tensor([prompt + word])).logits[0].log_softmax(-1)
        values = [logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(word)]
        return sum(values) / (len(values) if normalize else 1)

    for r, p in enumerate(prompts):
        expected = [by_hand(p, words[0][0]), (by_hand(p, words[1][0]) + by_hand(p, words[1][1])) / 2]
        assert got[r].tolist() == pytest.approx(expected, abs=1e-4)


def test_the_prompt_ends_before_the_mask_and_demonstrations_carry_their_label_word(tokenizer):
    before, after = causal.prepare(tokenizer, "Review: {text} It was {mask}. End", pair=False)
    text = tokenizer("a fine day", add_special_tokens=False)["input_ids"]
    good = word_pieces(tokenizer, "good")
    ids = causal.render(tokenizer, (before, after), {"text": text}, [], 64, 1)
    assert tokenizer.decode(ids) == "Review: a fine day It was"  # the space before {mask} goes with the word
    demo = tokenizer("a dull day", add_special_tokens=False)["input_ids"]
    ids = causal.render(tokenizer, (before, after), {"text": text}, [({"text": demo}, good)], 64, 1)
    assert tokenizer.decode(ids) == "Review: a dull day It was good. End\n\nReview: a fine day It was"
    # truncation cuts texts only: the template's words and the demonstration's label word stay
    cut = causal.render(tokenizer, (before, after), {"text": text * 10}, [({"text": demo * 10}, good)], 40, 1)
    assert (
        len(cut) <= 39
        and tokenizer.decode(cut).endswith(" It was")
        and " It was good. End\n\n" in tokenizer.decode(cut)
    )


# ---- zero-shot: the scoring is exact ------------------------------------------------------------------


@pytest.mark.parametrize("winner", ["neg", "pos"])
def test_zero_shot_on_a_gpt_biased_to_one_label_word_gives_that_label(tmp_path, tokenizer, sentiment, winner):
    """The model favours every piece of a multi-token word (and 2 in-context demonstrations change nothing):
    every example gets that word's label."""
    from toolkit.finetuning.predict import predict

    loser = "pos" if winner == "neg" else "neg"
    model = _tiny_gpt(tmp_path / "biased", tokenizer, word_pieces(tokenizer, MULTI))
    r = recipe(tmp_path / winner, model, sentiment, verbalizer={winner: MULTI, loser: "good"}, demonstrations=2)
    result = toolkit.finetune(r)
    m = result.metrics
    assert m["steps"] == 0 and m["test_accuracy"] == 0.5  # the test split is balanced: half are `winner`
    assert set(_predictions(result.output_dir / "test_predictions.csv")) == {winner}
    prompt = json.loads((result.output_dir / "prompt.json").read_text())
    assert prompt["model"] == "causal" and len(prompt["demonstrations"]) == 2
    assert prompt["label_word_ids"][0 if winner == "neg" else 1] == [word_pieces(tokenizer, MULTI)]
    out, scores = predict(result.output_dir, str(sentiment), tmp_path / "p.csv")
    assert set(_predictions(out)) == {winner} and len(_predictions(out)) == 64 and scores["accuracy"] == 0.5
    if winner == "pos":  # the model card's plain-transformers code runs and gives the same answer
        import contextlib
        import io

        card = (result.output_dir / "README.md").read_text()
        code = card.split("```python\n", 1)[1].split("```", 1)[0]
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(code, "card", "exec"), {})
        assert printed.getvalue().strip() == winner


# ---- demonstrations ---------------------------------------------------------------------------------


def _rendered(tmp_path, model, sentiment, tokenizer, seed, k=3):
    from toolkit.config import resolve
    from toolkit.finetuning.config import FinetuneRecipe
    from toolkit.finetuning.tasks import load_task

    r = resolve(FinetuneRecipe, recipe(tmp_path / "d", model, sentiment, demonstrations=k), {"training.seed": seed})
    data = load_task(r.task, tokenizer)
    kept = causal.encode_task(data, tokenizer, r.prompt, r.task.max_seq_length, seed)
    return data, kept


def test_demonstrations_are_k_training_examples_by_seed_never_the_evaluated_one(
    tmp_path, tokenizer, random_gpt, sentiment
):
    data, kept = _rendered(tmp_path, random_gpt, sentiment, tokenizer, seed=1)
    again, kept_again = _rendered(tmp_path, random_gpt, sentiment, tokenizer, seed=1)
    _, other = _rendered(tmp_path, random_gpt, sentiment, tokenizer, seed=2)
    assert len(kept["demonstrations"]) == 3
    assert kept["demonstrations"] == kept_again["demonstrations"] and data.test["clm_ids"] == again.test["clm_ids"]
    assert kept["demonstrations"] != other["demonstrations"]
    train_texts = data.train["text"][:]
    held_out = set(data.validation["text"][:]) | set(data.test["text"][:])
    demo_texts = [texts["text"] for texts, _ in kept["demonstrations"]]
    assert all(t in train_texts and t not in held_out for t in demo_texts)
    # each demonstration is rendered with its true label's word; an example never sees itself
    for split in ("train", "validation", "test"):
        ds = getattr(data, split)
        for text, ids in zip(ds["text"][:], ds["clm_ids"][:]):
            decoded = tokenizer.decode(ids[0])
            assert decoded.count(text.strip()) == 1 and decoded.endswith(f"{text.strip()} it was")
            shown = [t for t in train_texts if t.strip() in decoded and t != text]
            assert len(shown) == 3
            for t in shown:
                word = "good" if data.train["labels"][train_texts.index(t)] == data.labels.index("pos") else "foul"
                assert f"{t.strip()} it was {word} ." in decoded
    # a training example that is one of the k sees the spare in its place, not itself
    own = [train_texts.index(t) for t in demo_texts]
    for r in own:
        assert tokenizer.decode(data.train["clm_ids"][r][0]).count(train_texts[r].strip()) == 1


def test_demonstrations_need_a_causal_lm_and_enough_training_rows(
    tmp_path, tokenizer, random_gpt, sentiment, wordpiece_dir
):
    from toolkit.config import resolve
    from toolkit.finetuning.config import FinetuneRecipe
    from toolkit.finetuning.tasks import load_task

    r = resolve(FinetuneRecipe, recipe(tmp_path / "d", random_gpt, sentiment, demonstrations=40))
    data = load_task(r.task, tokenizer)
    with pytest.raises(ToolkitError, match="needs at least 41 training examples"):
        causal.encode_task(data, tokenizer, r.prompt, r.task.max_seq_length, 0)
    with pytest.raises(ToolkitError, match="must be a whole number"):
        resolve(FinetuneRecipe, recipe(tmp_path / "d", random_gpt, sentiment, demonstrations=-1))


# ---- fine-tuning ------------------------------------------------------------------------------------


def test_fine_tuning_on_label_scores_learns_and_predict_matches(tmp_path, random_gpt, sentiment):
    from toolkit.engine.tracking import read_metrics
    from toolkit.finetuning.predict import predict

    r = recipe(tmp_path / "ft", random_gpt, sentiment, length_normalize=True)
    r["task"]["max_seq_length"] = 24
    r["training"].update(num_train_epochs=4, learning_rate=3e-3, logging_steps=4, warmup_ratio=0.0)
    result = toolkit.finetune(r)
    losses = [m["loss"] for m in read_metrics(result.output_dir) if "loss" in m]
    assert result.metrics["steps"] == 16 and len(losses) == 4
    assert losses[-1] < losses[0] - 0.1  # cross-entropy over the two label words' likelihoods falls
    assert result.metrics["test_accuracy"] > 0.5
    with (result.output_dir / "test_predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    test_file = _write_csv(tmp_path / "test.csv", [(row["text"], row["label"]) for row in rows])
    out, scores = predict(result.output_dir, str(test_file), tmp_path / "p.csv")
    assert _predictions(out) == [row["prediction"] for row in rows]
    assert scores["accuracy"] == pytest.approx(result.metrics["test_accuracy"])


def test_the_toolkits_own_gpt_pretraining_output_is_scored_as_a_causal_lm(tmp_path, corpus_dir, bpe_dir, sentiment):
    """`toolkit pretrain` with objective clm writes a GPT2LMHeadModel: cloze picks the causal scorer for it
    (a masked LM's scorer would need a mask token, which its tokenizer lacks), and predict agrees."""
    from conftest import tiny_gpt_recipe

    from toolkit.finetuning.predict import predict

    gpt = tmp_path / "gpt"
    toolkit.pretrain(tiny_gpt_recipe(gpt, corpus_dir, bpe_dir, max_steps=2, eval_on_start=False))
    result = toolkit.finetune(recipe(tmp_path / "zs", gpt, sentiment, demonstrations=1))
    prompt = json.loads((result.output_dir / "prompt.json").read_text())
    assert prompt["model"] == "causal" and len(prompt["demonstrations"]) == 1
    with (result.output_dir / "test_predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    test_file = _write_csv(tmp_path / "test.csv", [(row["text"], row["label"]) for row in rows])
    out, _ = predict(result.output_dir, str(test_file), tmp_path / "p.csv")
    with out.open() as fh:
        again = list(csv.DictReader(fh))
    assert [r["prediction"] for r in again] == [r["prediction"] for r in rows]
    assert [float(r["p_pos"]) for r in again] == pytest.approx([float(r["p_pos"]) for r in rows], abs=1e-3)


def test_demonstrations_on_a_masked_lm_are_refused_before_training(tmp_path, wordpiece_dir, sentiment):
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from toolkit.engine import loop

    tokenizer = AutoTokenizer.from_pretrained(wordpiece_dir)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    BertForMaskedLM(config).save_pretrained(tmp_path / "mlm")
    tokenizer.save_pretrained(tmp_path / "mlm")
    r = recipe(tmp_path / "bad", tmp_path / "mlm", sentiment, demonstrations=2)
    r["training"]["num_train_epochs"] = 1
    trained = []
    original = loop.train
    loop.train = lambda *a, **k: trained.append(1) or original(*a, **k)
    try:
        with pytest.raises(ToolkitError, match="prompt.demonstrations=2 is for causal LMs"):
            toolkit.finetune(r)
    finally:
        loop.train = original
    assert not trained and not (tmp_path / "bad" / "checkpoints").exists()


def test_predict_with_a_template_on_a_causal_lm_scores_the_label_words(tmp_path, tokenizer, sentiment):
    """`toolkit predict GPT FILE --template --verbalizer` on a GPT that favours one word's pieces: every
    row gets that word's label, with the probabilities of the zero-shot run saved by finetune."""
    from toolkit.cli import main as cli_main
    from toolkit.finetuning.predict import predict

    model = _tiny_gpt(tmp_path / "biased", tokenizer, word_pieces(tokenizer, MULTI))
    r = recipe(tmp_path / "zs", model, sentiment, verbalizer={"neg": "good", "pos": MULTI})
    saved, _ = predict(toolkit.finetune(r).output_dir, str(sentiment), tmp_path / "saved.csv")
    out = tmp_path / "cli.csv"
    template = r["prompt"]["template"]
    argv = ["predict", str(model), str(sentiment), "--output", str(out), "--template", template]
    assert cli_main([*argv, "--verbalizer", f"{{neg: good, pos: {MULTI}}}"]) == 0
    assert set(_predictions(out)) == {"pos"} and len(_predictions(out)) == 64
    with saved.open() as a, out.open() as b:
        first, second = list(csv.DictReader(a)), list(csv.DictReader(b))
    assert [float(x["p_pos"]) for x in second] == pytest.approx([float(x["p_pos"]) for x in first], abs=1e-6)
