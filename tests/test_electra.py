"""ELECTRA replaced-token detection: shared embeddings, masking, sampling, labels, outputs, resume."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml
from conftest import REPO, TINY_MODEL, run_cli, tiny_bert_recipe

import toolkit
from toolkit.config import PretrainRecipe, merge, resolve
from toolkit.engine.tracking import read_metrics
from toolkit.errors import ToolkitError
from toolkit.objectives import OBJECTIVES
from toolkit.objectives.electra import electra_model, generator_config, gumbel_max
from toolkit.tokenizer import load_tokenizer

TINY_ELECTRA = {**TINY_MODEL, "embedding_size": 32}  # discriminator hidden 64 -> generator hidden 16


def electra_recipe(output_dir, corpus_dir, tokenizer_dir=None, **training) -> dict:
    recipe = tiny_bert_recipe(output_dir, corpus_dir, tokenizer_dir, **training)
    recipe["model"] = {"architecture": "electra", "size": "tiny", "config_overrides": dict(TINY_ELECTRA)}
    recipe["objective"] = {"name": "rtd"}
    return recipe


@pytest.fixture(scope="module")
def tokenizer(wordpiece_dir):
    return load_tokenizer(wordpiece_dir)


def make_objective(tmp_path, corpus_dir, tokenizer, **objective):
    recipe = resolve(PretrainRecipe, merge(electra_recipe(tmp_path, corpus_dir), {"objective": objective}))
    torch.manual_seed(0)
    return OBJECTIVES["rtd"].from_recipe(recipe, tokenizer)


@pytest.fixture(scope="module")
def blocks(corpus_dir, tokenizer):
    from toolkit.config import DataArgs
    from toolkit.data.blocks import prepare_blocks
    from toolkit.data.loader import BlockDataset

    data = DataArgs(train_files=[str(corpus_dir)], max_seq_length=32, validation_split_percentage=0)
    return BlockDataset(prepare_blocks(data, tokenizer, 0).train)


def test_generator_and_discriminator_share_one_embedding_tensor(tmp_path, corpus_dir, tokenizer):
    objective = make_objective(tmp_path, corpus_dir, tokenizer)
    gen, disc = objective.generator, objective.model
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        g, d = getattr(gen.electra.embeddings, name).weight, getattr(disc.electra.embeddings, name).weight
        assert g is d and g.data_ptr() == d.data_ptr()
    assert gen.generator_lm_head.weight.data_ptr() == disc.electra.embeddings.word_embeddings.weight.data_ptr()
    # One optimizer sees each shared tensor once.
    from toolkit.engine.optim import param_groups

    grouped = [p for group in param_groups(objective, 0.01) for p in group["params"]]
    assert len(grouped) == len({id(p) for p in objective.parameters()})


def test_generator_is_the_configured_fraction_of_the_discriminator(tmp_path, corpus_dir, tokenizer):
    objective = make_objective(tmp_path, corpus_dir, tokenizer)
    gen, disc = objective.generator.config, objective.model.config
    assert (gen.hidden_size, gen.num_attention_heads, gen.intermediate_size) == (16, 1, 64)
    assert gen.num_hidden_layers == disc.num_hidden_layers and gen.embedding_size == disc.embedding_size
    half = make_objective(tmp_path, corpus_dir, tokenizer, generator_hidden_fraction=0.5).generator.config
    assert half.hidden_size == disc.hidden_size // 2
    from transformers import ElectraConfig

    small = generator_config(ElectraConfig(hidden_size=256, num_attention_heads=4), 0.25)
    assert (small.hidden_size, small.num_attention_heads, small.intermediate_size) == (64, 1, 256)


def electra_preset(tmp_path, corpus_dir, tokenizer, size, layers=None, **objective):
    """An rtd objective on a size preset (optionally fewer layers, to build quickly)."""
    recipe = electra_recipe(tmp_path, corpus_dir)
    recipe["model"] = {"architecture": "electra", "size": size, "config_overrides": {}}
    if layers:
        recipe["model"]["config_overrides"]["num_hidden_layers"] = layers
    recipe["objective"].update(objective)
    torch.manual_seed(0)
    return OBJECTIVES["rtd"].from_recipe(resolve(PretrainRecipe, recipe), tokenizer)


def shape(config) -> tuple:
    return (
        config.num_hidden_layers,
        config.hidden_size,
        config.num_attention_heads,
        config.intermediate_size,
        config.embedding_size,
    )


def test_electra_presets_size_the_generator_and_masking_as_the_paper(tmp_path, corpus_dir, tokenizer):
    # ELECTRA-Small: 12 x 256, 4 heads, embeddings 128; generator 1/4 (64, 1 head), as deep.
    small = electra_preset(tmp_path, corpus_dir, tokenizer, "small")
    assert shape(small.model.config) == (12, 256, 4, 1024, 128)
    assert shape(small.generator.config) == (12, 64, 1, 256, 128)
    # ELECTRA-Base: 12 x 768; generator 1/3 (256, 4 heads).
    base = electra_preset(tmp_path, corpus_dir, tokenizer, "base")
    assert shape(base.model.config) == (12, 768, 12, 3072, 768)
    assert shape(base.generator.config) == (12, 256, 4, 1024, 768)
    assert small.make_collator(tokenizer, 0).masker.mlm_probability == 0.15
    assert base.make_collator(tokenizer, 0).masker.mlm_probability == 0.15
    # The recipe's own fraction wins.
    quarter = electra_preset(tmp_path, corpus_dir, tokenizer, "base", layers=1, generator_hidden_fraction=0.25)
    assert quarter.generator.config.hidden_size == 192
    # ELECTRA-Large (24 x 1024; one layer here, to build quickly): generator 1/4, 25% of tokens masked.
    large = electra_preset(tmp_path, corpus_dir, tokenizer, "large", layers=1)
    assert shape(large.model.config)[1:] == (1024, 16, 4096, 1024)
    assert shape(large.generator.config)[1:] == (256, 4, 1024, 1024)
    assert large.make_collator(tokenizer, 0).masker.mlm_probability == 0.25
    set_large = electra_preset(tmp_path, corpus_dir, tokenizer, "large", layers=1, mlm_probability=0.15)
    assert set_large.make_collator(tokenizer, 0).masker.mlm_probability == 0.15


def test_a_checkpoint_is_sized_by_its_dimensions(tmp_path, corpus_dir, tokenizer):
    from transformers import ElectraConfig, ElectraForPreTraining

    from toolkit.config import ObjectiveArgs

    assert electra_model(ElectraConfig(num_hidden_layers=12, hidden_size=768)) == "base"
    assert electra_model(ElectraConfig(num_hidden_layers=24, hidden_size=1024)) == "large"
    assert electra_model(ElectraConfig(num_hidden_layers=4, hidden_size=256)) is None  # mini: not ELECTRA's
    tiny = ElectraForPreTraining(ElectraConfig(vocab_size=len(tokenizer), **TINY_ELECTRA))
    objective = OBJECTIVES["rtd"](tiny, ObjectiveArgs(name="rtd"))
    assert objective.size is None and objective.generator.config.hidden_size == 16
    assert objective.make_collator(tokenizer, 0).masker.mlm_probability == 0.15


def test_masking_follows_electra(tmp_path, corpus_dir, tokenizer, blocks):
    objective = make_objective(tmp_path, corpus_dir, tokenizer)
    batch = blocks.__getitems__(list(range(min(len(blocks), 256))))
    out = objective.make_collator(tokenizer, seed=0)(batch)
    ids, labels = batch["input_ids"], out["labels"]
    selected = labels != -100
    special = torch.isin(ids, torch.tensor(tokenizer.all_special_ids))
    assert not (selected & special).any()  # special tokens are never selected
    assert selected[~special].float().mean() == pytest.approx(0.15, abs=0.01)
    assert torch.equal(labels[selected], ids[selected])
    as_mask = out["input_ids"][selected] == tokenizer.mask_token_id
    assert as_mask.float().mean() == pytest.approx(0.85, abs=0.02)
    assert torch.equal(out["input_ids"][selected][~as_mask], ids[selected][~as_mask])  # the rest unchanged
    assert torch.equal(out["input_ids"][~selected], ids[~selected])
    assert out["sample_seed"].shape == (ids.shape[0],)


def test_electra_fixed_count_masking_keeps_its_split(tmp_path, corpus_dir, tokenizer, blocks):
    """ELECTRA's own count (round(0.15 x 32) = 5 per block, here capped at 4), and its 85% [MASK] /
    15% kept, through the recipe's objective options."""
    objective = make_objective(tmp_path, corpus_dir, tokenizer, masking="fixed_count", max_predictions_per_seq=4)
    batch = blocks.__getitems__(list(range(min(len(blocks), 256))))
    out = objective.make_collator(tokenizer, seed=0)(batch)
    ids, selected = batch["input_ids"], out["labels"] != -100
    assert (selected.sum(1) == 4).all()
    as_mask = out["input_ids"][selected] == tokenizer.mask_token_id
    assert as_mask.float().mean() == pytest.approx(0.85, abs=0.04)
    assert torch.equal(out["input_ids"][selected][~as_mask], ids[selected][~as_mask])  # none random


def test_gumbel_max_samples_the_softmax_per_example_seed():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0]).repeat(20000, 1)
    samples = gumbel_max(logits, torch.tensor([20000]), torch.tensor([7]))
    freq = torch.bincount(samples, minlength=4).float() / len(samples)
    torch.testing.assert_close(freq, torch.softmax(logits[0], 0), atol=0.01, rtol=0)
    # An example's samples depend on its seed only, not on the other examples of its batch.
    alone = gumbel_max(logits[:5], torch.tensor([5]), torch.tensor([3]))
    together = gumbel_max(logits[:12], torch.tensor([7, 5]), torch.tensor([11, 3]))
    assert torch.equal(alone, together[7:])
    assert not torch.equal(alone.repeat(4), gumbel_max(logits[:20], torch.tensor([20]), torch.tensor([4])))


def test_discriminator_labels_are_exactly_input_differs_from_original(tmp_path, corpus_dir, tokenizer):
    objective = make_objective(tmp_path, corpus_dir, tokenizer)
    forced = 100  # make the generator sample this token everywhere
    with torch.no_grad():
        objective.generator.generator_lm_head.bias.fill_(-1e4)
        objective.generator.generator_lm_head.bias[forced] = 1e4
    original = torch.tensor([[2, 50, forced, 51, 52, 3, 60, forced, 61, 3], [2, 70, 71, forced, 72, 73, 74, 75, 76, 3]])
    selected = torch.zeros_like(original, dtype=torch.bool)
    selected[0, [1, 2, 4]] = selected[1, [3, 4, 8]] = True
    labels = torch.where(selected, original, torch.full_like(original, -100))
    masked = torch.where(selected, torch.full_like(original, tokenizer.mask_token_id), original)
    masked[1, 4] = original[1, 4]  # a selected token kept as it is (the 15%)
    batch = {"input_ids": masked, "labels": labels, "sample_seed": torch.tensor([1, 2])}

    _, corrupted, is_replaced = objective.generate(batch)
    assert torch.equal(corrupted[selected], torch.full((6,), forced))
    assert torch.equal(corrupted[~selected], original[~selected])
    assert torch.equal(is_replaced, corrupted != original)
    expected = torch.zeros_like(selected)
    expected[0, [1, 4]] = expected[1, [4, 8]] = True  # sampled == original at [0, 2] and [1, 3]: not replaced
    assert torch.equal(is_replaced, expected)


def test_discriminator_loss_sends_no_gradient_into_the_generator(tmp_path, corpus_dir, tokenizer, blocks):
    objective = make_objective(tmp_path, corpus_dir, tokenizer)
    batch = objective.make_collator(tokenizer, seed=0)(blocks.__getitems__(list(range(8))))
    losses, _ = objective(batch)
    losses["rtd"].backward()
    shared = {id(p) for p in objective.model.electra.embeddings.parameters()}
    own = [(n, p) for n, p in objective.generator.named_parameters() if id(p) not in shared]
    assert own and all(p.grad is None for _, p in own), [n for n, p in own if p.grad is not None]
    assert objective.model.electra.embeddings.word_embeddings.weight.grad is not None  # shared: trained by both
    assert all(p.grad is not None for p in objective.model.discriminator_predictions.parameters())
    # ... while the generator loss does reach them.
    objective.zero_grad()
    objective(batch)[0]["mlm"].backward()
    assert all(p.grad is not None for _, p in own)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"model": {"architecture": "bert"}}, "cannot train model.architecture 'bert'"),
        ({"objective": {"generator_hidden_fraction": 0.0}}, "generator_hidden_fraction"),
        ({"objective": {"generator_hidden_fraction": 1.5}}, "generator_hidden_fraction"),
        (
            {"model": {"config_overrides": {"hidden_size": 768}}, "objective": {"generator_hidden_fraction": 0.3}},
            "heads",
        ),
        ({"objective": {"discriminator_weight": 0}}, "discriminator_weight"),
        ({"objective": {"mask_replace_prob": 0.9, "random_replace_prob": 0.2}}, "sum to at most 1"),
    ],
)
def test_bad_rtd_recipes_are_rejected(tmp_path, corpus_dir, override, message):
    with pytest.raises(ToolkitError, match=message):
        resolve(PretrainRecipe, merge(electra_recipe(tmp_path, corpus_dir), override))


def test_cli_rtd_lowers_its_loss_and_saves_both_networks(tmp_path, corpus_dir, wordpiece_dir):
    from safetensors.torch import load_file
    from transformers import (
        AutoModelForMaskedLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        ElectraForMaskedLM,
        ElectraForPreTraining,
    )

    out = tmp_path / "electra"
    proc = run_cli(
        "pretrain",
        str(REPO / "recipes" / "electra-rtd.yaml"),
        f"output_dir={out}",
        f"data.train_files=[{corpus_dir}]",
        f"tokenizer.path={wordpiece_dir}",
        "data.validation_split_percentage=10",
        "data.max_seq_length=32",
        "model.size=tiny",
        f"model.config_overrides={yaml.safe_dump(TINY_ELECTRA, default_flow_style=True).strip()}",
        "training.max_steps=30",
        "training.eval_steps=15",
        "training.save_steps=0",
        "training.per_device_train_batch_size=8",
        "training.learning_rate=2e-3",
        "training.warmup_steps=2",
        "training.logging_steps=1",
        "training.max_eval_batches=4",
        "training.report_to=[]",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "validation discriminator_accuracy" in proc.stdout
    tokenizer_files = {"tokenizer.json", "tokenizer_config.json"}
    assert {p.name for p in out.iterdir()} == {
        "config.json",
        "model.safetensors",
        *tokenizer_files,
        "recipe.yaml",
        "results.json",
        "README.md",
        "metrics.jsonl",
        "checkpoints",
        "generator",
    }
    assert {p.name for p in (out / "generator").iterdir()} == {"config.json", "model.safetensors", *tokenizer_files}

    evals = [m for m in read_metrics(out) if "eval_loss" in m]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 5
    assert evals[-1]["eval_mlm_loss"] < evals[0]["eval_mlm_loss"]
    assert evals[-1]["eval_rtd_loss"] < evals[0]["eval_rtd_loss"]
    for key in ("generator_accuracy", "discriminator_accuracy", "replaced_precision", "replaced_recall"):
        assert 0 <= evals[-1][f"eval_{key}"] <= 1

    # Plain transformers loads both networks; they match the trained weights of the checkpoint.
    disc, info = ElectraForPreTraining.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    gen, info = AutoModelForMaskedLM.from_pretrained(out / "generator", output_loading_info=True)
    assert isinstance(gen, ElectraForMaskedLM) and not info["missing_keys"] and not info["unexpected_keys"]
    assert gen.config.hidden_size == disc.config.hidden_size // 4
    classifier, info = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert type(classifier).__name__ == "ElectraForSequenceClassification"
    assert all(k.startswith("classifier.") for k in info["missing_keys"])

    state = load_file(out / "checkpoints" / "checkpoint-30" / "model.safetensors")
    trained_disc, trained_gen = ElectraForPreTraining(disc.config), ElectraForMaskedLM(gen.config)
    for prefix, model in (("model.", trained_disc), ("generator.", trained_gen)):
        part = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        if prefix == "generator.":  # shared tensors are stored once, under the discriminator's name
            part.update({k.removeprefix("model."): v for k, v in state.items() if ".embeddings." in k})
        model.load_state_dict(part, strict=False)
        model.tie_weights()
    tok = AutoTokenizer.from_pretrained(out / "generator")
    batch = tok(["to be or not to be, that is the [MASK]."], return_tensors="pt")
    with torch.no_grad():
        for saved, trained in ((disc, trained_disc), (gen, trained_gen)):
            torch.testing.assert_close(saved.eval()(**batch).logits, trained.eval()(**batch).logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        gen.electra.embeddings.word_embeddings.weight, disc.electra.embeddings.word_embeddings.weight
    )
    assert "ElectraForPreTraining" in (out / "README.md").read_text()

    # `toolkit evaluate` scores the generator; the discriminator has no masked-LM head to score.
    with pytest.raises(ToolkitError, match="evaluate its generator"):
        toolkit.evaluate(out, [str(corpus_dir)], max_seq_length=32)
    scores = toolkit.evaluate(out / "generator", [str(corpus_dir)], max_seq_length=32)
    assert scores["objective"] == "mlm" and scores["perplexity"] < 1000


def test_rtd_in_memory_model_is_the_saved_discriminator(tmp_path, corpus_dir, wordpiece_dir):
    from transformers import ElectraForPreTraining

    result = toolkit.pretrain(electra_recipe(tmp_path / "mem", corpus_dir, wordpiece_dir, max_steps=3))
    saved = ElectraForPreTraining.from_pretrained(result.output_dir).eval()
    ids = torch.tensor([[2, 17, 42, 99, 3]])
    with torch.no_grad():
        torch.testing.assert_close(saved(ids).logits, result.model.eval()(ids).logits, rtol=0, atol=1e-5)


def test_rtd_resume_restores_both_networks(tmp_path, corpus_dir, wordpiece_dir):
    from safetensors.torch import load_file

    recipe = electra_recipe(tmp_path / "a", corpus_dir, wordpiece_dir, max_steps=12, save_steps=6, eval_on_start=False)
    recipe["model"]["config_overrides"].update(hidden_dropout_prob=0.1)  # the RNG state must be restored too
    full = toolkit.pretrain(recipe)
    losses = [m["loss"] for m in read_metrics(full.output_dir) if "loss" in m]
    weights = {p: load_file(full.output_dir / p / "model.safetensors") for p in ("", "generator")}

    shutil.rmtree(full.output_dir / "checkpoints" / "checkpoint-12")
    shutil.rmtree(full.output_dir / "generator")
    (full.output_dir / "model.safetensors").unlink()
    resumed = toolkit.pretrain(recipe, training__resume_from_checkpoint="auto")
    assert [m["loss"] for m in read_metrics(resumed.output_dir) if "loss" in m] == pytest.approx(losses, abs=1e-6)
    for part, expected in weights.items():
        got = load_file(resumed.output_dir / part / "model.safetensors")
        assert got.keys() == expected.keys()
        for k, v in got.items():
            torch.testing.assert_close(v, expected[k], rtol=0, atol=1e-6)
