"""Structured pruning: heads and neurons really leave the matrices, the right ones leave, and the saved
folder loads back (with its model code when heads went, as a plain transformers model otherwise)."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_GPT, TINY_MODEL
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
)

from toolkit.compression.structured import (
    check_structured,
    importance_scores,
    magnitude_scores,
    prune_structured,
    save_pruned,
)
from toolkit.errors import ToolkitError

VOCAB, MAX_POSITIONS, SEQ = 100, 40, 12
BERT = {**TINY_MODEL, "num_attention_heads": 4, "vocab_size": VOCAB, "max_position_embeddings": MAX_POSITIONS}


def tiny(model_type="bert", auto=AutoModelForSequenceClassification, attn="sdpa", **overrides):
    config = AutoConfig.for_model(model_type, **{**BERT, **overrides})
    torch.manual_seed(0)
    return auto.from_config(config, attn_implementation=attn).eval()


def inputs(seed=1, batch=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (batch, SEQ), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -4:] = 0  # some padding, so the attention mask takes part
    return {"input_ids": ids, "attention_mask": mask}


def labelled(seed):
    return {**inputs(seed), "labels": torch.tensor([0, 1, 1])}


def bert_classifier_params(heads: int, head_size: int, intermediate: int, hidden=64, layers=2, labels=2) -> int:
    """Parameters of BertForSequenceClassification, from the sizes alone."""
    width = heads * head_size
    embeddings = (VOCAB + MAX_POSITIONS + 2) * hidden + 2 * hidden  # word, position, token type; LayerNorm
    attention = 3 * (hidden * width + width) + (width * hidden + hidden) + 2 * hidden
    ffn = (hidden * intermediate + intermediate) + (intermediate * hidden + hidden) + 2 * hidden
    pooler, classifier = hidden * hidden + hidden, hidden * labels + labels
    return embeddings + layers * (attention + ffn) + pooler + classifier


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def zero_units(model, layer: int, head: int | None = None, neurons: list[int] | None = None) -> None:
    """Zero every parameter that belongs to one head and/or some neurons of one layer."""
    block = model.base_model.encoder.layer[layer]
    with torch.no_grad():
        if head is not None:
            rows = slice(16 * head, 16 * (head + 1))
            for lin in (block.attention.self.query, block.attention.self.key, block.attention.self.value):
                lin.weight[rows] = 0
                lin.bias[rows] = 0
            block.attention.output.dense.weight[:, rows] = 0
        if neurons is not None:
            block.intermediate.dense.weight[neurons] = 0
            block.intermediate.dense.bias[neurons] = 0
            block.output.dense.weight[:, neurons] = 0


def test_half_of_every_layer_goes_and_the_matrices_shrink():
    model = tiny()
    assert num_params(model) == bert_classifier_params(4, 16, 128)  # the formula itself is right

    summary = prune_structured(model, 0.5)

    config = model.config
    assert (config.num_attention_heads, config.intermediate_size, config.attention_head_size) == (2, 64, 16)
    for block in model.bert.encoder.layer:
        attention = block.attention.self
        for lin in (attention.query, attention.key, attention.value):
            assert lin.weight.shape == (32, 64) and lin.bias.shape == (32,)
        assert (attention.num_attention_heads, attention.all_head_size, attention.attention_head_size) == (2, 32, 16)
        assert attention.scaling == 16**-0.5
        assert block.attention.output.dense.weight.shape == (64, 32)
        assert block.intermediate.dense.weight.shape == (64, 64) and block.intermediate.dense.bias.shape == (64,)
        assert block.output.dense.weight.shape == (64, 64)
    assert num_params(model) == bert_classifier_params(2, 16, 64)
    assert summary["params_before"] == bert_classifier_params(4, 16, 128)
    assert summary["params_after"] == bert_classifier_params(2, 16, 64)
    assert (summary["heads_before"], summary["heads_after"]) == (4, 2)
    assert (summary["intermediate_before"], summary["intermediate_after"]) == (128, 64)
    assert [len(r) for r in summary["removed_heads"]] == [2, 2]
    logits = model(**inputs()).logits
    assert logits.shape == (3, 2) and torch.isfinite(logits).all()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_the_least_important_units_go_and_the_outputs_do_not_change(tmp_path, attn):
    model = tiny(attn=attn)
    dead_neurons = list(range(0, 128, 4))  # 32 of 128: what sparsity 0.25 removes
    zero_units(model, 0, head=1, neurons=dead_neurons)
    zero_units(model, 1, head=3, neurons=dead_neurons)
    live = [i for i in range(128) if i not in dead_neurons]
    expected_rows = model.bert.encoder.layer[1].intermediate.dense.weight[live].clone()
    before = model(**inputs()).logits

    heads, neurons = magnitude_scores(model)
    assert heads.argmin(1).tolist() == [1, 3]
    summary = prune_structured(model, 0.25)

    assert summary["removed_heads"] == [[1], [3]]
    assert model.config.num_attention_heads == 3  # 48 of 64: no longer a divisor of hidden_size
    assert torch.equal(model.bert.encoder.layer[1].intermediate.dense.weight, expected_rows)
    torch.testing.assert_close(model(**inputs()).logits, before, atol=1e-5, rtol=0)
    save_pruned(model, tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path, trust_remote_code=True).eval()
    torch.testing.assert_close(reloaded(**inputs()).logits, before, atol=1e-5, rtol=0)


def test_given_scores_decide_which_heads_go():
    model = tiny()
    heads = torch.tensor([[3.0, 2.0, 0.5, 4.0], [0.1, 2.0, 3.0, 0.2]])
    neurons = torch.rand(2, 128)
    summary = prune_structured(model, 0.5, (heads, neurons))
    assert summary["removed_heads"] == [[1, 2], [0, 3]]
    with pytest.raises(ValueError, match="do not fit"):
        prune_structured(tiny(), 0.5, (heads[:, :3], neurons))


def test_saved_folder_loads_with_its_code_and_gives_the_same_logits(tmp_path):
    from safetensors import safe_open

    model = tiny()
    prune_structured(model, 0.5, importance_scores(model, [labelled(2), labelled(3)]))
    save_pruned(model, tmp_path)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "toolkit_pruned.py"]
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and not [k for k in keys if k.endswith(("_orig", "_mask"))]

    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert type(reloaded).__name__ == "PrunedBertForSequenceClassification"
    assert num_params(reloaded) == num_params(model) == bert_classifier_params(2, 16, 64)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs()).logits, model(**inputs()).logits, atol=1e-5, rtol=0)
        encoder = AutoModel.from_pretrained(tmp_path, trust_remote_code=True).eval()
        hidden = encoder(**inputs()).last_hidden_state
        torch.testing.assert_close(hidden, model.bert(**inputs()).last_hidden_state, atol=1e-5, rtol=0)

    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path, trust_remote_code=False)


def test_neurons_only_is_a_plain_transformers_model(tmp_path):
    model = tiny()
    summary = prune_structured(model, 0.5, heads=False)
    assert (summary["heads_after"], summary["intermediate_after"], summary["removed_heads"]) == (4, 64, [[], []])
    save_pruned(model, tmp_path)

    assert not (tmp_path / "toolkit_pruned.py").exists()
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)  # no remote code
    assert type(reloaded).__name__ == "BertForSequenceClassification"
    assert reloaded.config.intermediate_size == 64
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(**inputs()).logits, model(**inputs()).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("model_type", "auto", "extra"),
    [
        ("electra", AutoModelForSequenceClassification, {"embedding_size": 32}),
        ("bert", AutoModelForMaskedLM, {}),
        ("roberta", AutoModelForMaskedLM, {"pad_token_id": 1}),
    ],
)
def test_other_encoders_and_heads_reload_the_same(tmp_path, model_type, auto, extra):
    model = tiny(model_type, auto, **extra)
    summary = prune_structured(model, 0.5)
    assert summary["params_after"] < summary["params_before"]
    save_pruned(model, tmp_path)

    reloaded = auto.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert type(reloaded).__name__ == f"Pruned{type(model).__name__}"
    assert num_params(reloaded) == num_params(model)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs()).logits, model(**inputs()).logits, atol=1e-5, rtol=0)


def _loss_with_gate(model, batch, weight: torch.Tensor, columns, gate: float) -> float:
    """The loss with some columns of an output dense scaled by `gate`."""
    saved = weight[:, columns].clone()
    with torch.no_grad():
        weight[:, columns] *= gate
        loss = model(**batch).loss.item()
        weight[:, columns] = saved
    return loss


def test_importance_is_the_gate_derivative_summed_over_batches():
    model = tiny().double()
    model.train()
    model.bert.encoder.layer[0].attention.output.dense.weight.requires_grad_(False)  # flags must come back
    flags = [p.requires_grad for p in model.parameters()]
    batches = [labelled(4), labelled(5)]

    heads, neurons = importance_scores(model, batches)

    assert heads.shape == (2, 4) and neurons.shape == (2, 128)
    assert (heads >= 0).all() and (neurons >= 0).all() and heads.sum() > 0
    assert all(p.grad is None for p in model.parameters())
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    one, two = importance_scores(model, batches[:1]), importance_scores(model, batches[1:])
    torch.testing.assert_close(heads, one[0] + two[0])
    torch.testing.assert_close(neurons, one[1] + two[1])

    # |dL/dgate| by central differences, for head 2 of layer 1 and neuron 7 of layer 0, first batch.
    model.eval()
    layer0, layer1 = model.bert.encoder.layer
    eps = 1e-4
    for weight, columns, score in (
        (layer1.attention.output.dense.weight, slice(32, 48), one[0][1, 2]),
        (layer0.output.dense.weight, [7], one[1][0, 7]),
    ):
        up = _loss_with_gate(model, batches[0], weight, columns, 1 + eps)
        down = _loss_with_gate(model, batches[0], weight, columns, 1 - eps)
        assert abs((up - down) / (2 * eps)) == pytest.approx(score.item(), rel=1e-3)


def test_unsupported_models_are_refused_with_the_way_out():
    gpt2 = AutoModel.from_config(AutoConfig.for_model("gpt2", vocab_size=VOCAB, **TINY_GPT))
    with pytest.raises(ToolkitError, match=r"compress\.structured=false"):
        check_structured(gpt2)
    with pytest.raises(ToolkitError, match="gpt2"):
        prune_structured(gpt2, 0.5)

    custom = tiny()
    custom.config.auto_map = {"AutoModelForSequenceClassification": "toolkit_pooling.MeanPooledBert"}
    with pytest.raises(ToolkitError, match=r"custom model code.*compress\.structured=false"):
        check_structured(custom)
    with pytest.raises(ToolkitError, match="sparsity"):
        prune_structured(tiny(), 1.0)
