"""End-to-end pretraining on real text with tiny models: loss, outputs, reload, resume."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import TINY_MODEL, run_cli, tiny_bert_recipe, tiny_gpt_recipe

import toolkit
import toolkit.errors
from toolkit.engine.tracking import read_metrics

EXPECTED_BERT_FILES = {
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "recipe.yaml",
    "results.json",
    "README.md",
    "metrics.jsonl",
    "checkpoints",
}


def _train_losses(output_dir) -> list[float]:
    return [m["loss"] for m in read_metrics(output_dir) if "loss" in m]


def test_cli_mlm_run_lowers_loss_and_saves_a_loadable_model(tmp_path, corpus_dir):
    import yaml
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_bert_recipe(tmp_path / "out", corpus_dir)))
    proc = run_cli("pretrain", str(recipe), "training.max_steps=30", "training.eval_steps=15")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == EXPECTED_BERT_FILES
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-30"]

    metrics = read_metrics(out)
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    assert len(evals) == 3  # before training, step 15, step 30
    assert evals[-1] < evals[0] - 0.5
    losses = _train_losses(out)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5

    # The saved folder is plain transformers: same logits as the last checkpoint's weights.
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForMaskedLM.from_pretrained(out).eval()
    from safetensors.torch import load_file

    state = load_file(out / "checkpoints" / "checkpoint-30" / "model.safetensors")
    in_memory = AutoModelForMaskedLM.from_config(model.config).eval()
    missing = in_memory.load_state_dict({k.removeprefix("model."): v for k, v in state.items()}, strict=False)
    assert not [k for k in missing.missing_keys if "decoder" not in k]  # the decoder is tied to the embeddings
    in_memory.tie_weights()
    batch = tok(["to be or not to be, that is the question"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, in_memory(**batch).logits, rtol=0, atol=1e-5)
    assert "validation metrics" in (out / "README.md").read_text().lower()


def test_python_api_clm_and_in_memory_logits(tmp_path, corpus_dir):
    from transformers import AutoModelForCausalLM

    result = toolkit.pretrain(tiny_gpt_recipe(tmp_path / "gpt", corpus_dir), training__max_steps=20)
    assert result.output_dir == tmp_path / "gpt"
    assert result.metrics["eval_loss"] < result.metrics["initial_eval_loss"]
    assert result.metrics["steps"] == 20
    model = AutoModelForCausalLM.from_pretrained(result.output_dir).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        logits = model(ids).logits
        torch.testing.assert_close(logits, result.model.eval()(ids).logits, rtol=0, atol=1e-5)
    assert logits.shape == (1, 5, model.config.vocab_size)
    assert {p.name for p in result.output_dir.iterdir()} >= {"generation_config.json", "model.safetensors"}


def test_resume_from_step_10_equals_uninterrupted_20(tmp_path, corpus_dir, wordpiece_dir):
    training = dict(max_steps=20, save_steps=10, save_total_limit=5, lr_scheduler_type="linear")
    recipe = tiny_bert_recipe(tmp_path / "a", corpus_dir, wordpiece_dir, **training)
    recipe["model"]["config_overrides"].update(hidden_dropout_prob=0.1)  # RNG state must be restored too
    full = toolkit.pretrain(recipe)
    straight = _train_losses(full.output_dir)
    final_state = _weights(full.output_dir)

    # Simulate a crash after the step-10 checkpoint: drop everything written after it.
    shutil.rmtree(full.output_dir / "checkpoints" / "checkpoint-20")
    (full.output_dir / "model.safetensors").unlink()
    resumed = toolkit.pretrain(recipe, training__resume_from_checkpoint="auto")
    assert _train_losses(resumed.output_dir) == pytest.approx(straight, abs=1e-6)
    resumed_state = _weights(resumed.output_dir)
    assert resumed_state.keys() == final_state.keys()
    for k, v in resumed_state.items():
        torch.testing.assert_close(v, final_state[k], rtol=0, atol=1e-6)


def test_extending_a_finished_run_equals_a_longer_run(tmp_path, corpus_dir, wordpiece_dir):
    constant = dict(lr_scheduler_type="constant", warmup_steps=0)
    short = tiny_bert_recipe(tmp_path / "ext", corpus_dir, wordpiece_dir, max_steps=10, **constant)
    toolkit.pretrain(short)
    extended = toolkit.pretrain(short, training__max_steps=20, training__resume_from_checkpoint="auto")
    straight = toolkit.pretrain(
        tiny_bert_recipe(tmp_path / "straight", corpus_dir, wordpiece_dir, max_steps=20, **constant)
    )
    assert extended.metrics["steps"] == 20
    assert _train_losses(extended.output_dir) == pytest.approx(_train_losses(straight.output_dir), abs=1e-6)
    a, b = _weights(extended.output_dir), _weights(straight.output_dir)
    assert a.keys() == b.keys()
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_second_run_reuses_the_tokenized_cache(tmp_path, corpus_dir, wordpiece_dir, capsys):
    recipe = tiny_bert_recipe(tmp_path / "c1", corpus_dir, wordpiece_dir, max_steps=1, eval_on_start=False)
    recipe["data"]["max_seq_length"] = 40  # a setting no other test uses: the first run must tokenize
    toolkit.pretrain(recipe)
    assert "corpus: " in capsys.readouterr().out
    recipe["output_dir"] = str(tmp_path / "c2")
    toolkit.pretrain(recipe)
    assert "corpus (cached): " in capsys.readouterr().out


def _weights(output_dir) -> dict:
    from safetensors.torch import load_file

    return load_file(output_dir / "model.safetensors")


def test_metrics_jsonl_is_json_lines(tmp_path, corpus_dir, wordpiece_dir):
    result = toolkit.pretrain(tiny_bert_recipe(tmp_path / "m", corpus_dir, wordpiece_dir, max_steps=3))
    rows = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("step" in row for row in rows)
    assert [row["step"] for row in rows if "loss" in row] == [1, 2, 3]  # logging_steps=1: one line per step


def test_continue_from_a_checkpoint_folder_starts_where_it_ended(tmp_path, corpus_dir, wordpiece_dir):
    first = toolkit.pretrain(tiny_bert_recipe(tmp_path / "first", corpus_dir, wordpiece_dir, max_steps=15))
    recipe = tiny_bert_recipe(tmp_path / "second", corpus_dir, max_steps=2)
    recipe["model"] = {"model_name_or_path": str(first.output_dir)}
    second = toolkit.pretrain(recipe)
    # same weights, same tokenizer (taken from the folder), same validation blocks and masks
    assert second.metrics["initial_eval_loss"] == pytest.approx(first.metrics["eval_loss"], abs=1e-5)


def test_bf16_and_tensorboard(tmp_path, corpus_dir, wordpiece_dir):
    recipe = tiny_bert_recipe(
        tmp_path / "bf16", corpus_dir, wordpiece_dir, max_steps=3, mixed_precision="bf16", report_to=["tensorboard"]
    )
    result = toolkit.pretrain(recipe)
    assert result.metrics["eval_loss"] < result.metrics["initial_eval_loss"] + 0.05
    events = list((result.output_dir / "runs").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_checkpoints_rotate_and_auto_resume_skips_incomplete_ones(tmp_path, corpus_dir, wordpiece_dir):
    from toolkit.engine.checkpoint import complete_checkpoints, resolve_resume

    recipe = tiny_bert_recipe(
        tmp_path / "rot", corpus_dir, wordpiece_dir, max_steps=6, save_steps=2, save_total_limit=2, eval_on_start=False
    )
    result = toolkit.pretrain(recipe)
    assert [step for step, _ in complete_checkpoints(result.output_dir)] == [4, 6]
    # A checkpoint folder without its state file (a crash while writing) is never picked.
    broken = result.output_dir / "checkpoints" / "checkpoint-8"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"partial")
    (result.output_dir / "checkpoints" / ".tmp-checkpoint-10").mkdir()
    assert resolve_resume(result.output_dir, "auto").name == "checkpoint-6"
    with pytest.raises(toolkit.errors.ToolkitError, match="not a complete checkpoint"):
        resolve_resume(result.output_dir, str(broken))


def test_num_train_epochs_sets_the_number_of_steps(tmp_path, corpus_dir, wordpiece_dir):
    recipe = tiny_bert_recipe(
        tmp_path / "ep", corpus_dir, wordpiece_dir, max_steps=-1, num_train_epochs=0.05, eval_on_start=False
    )
    result = toolkit.pretrain(recipe)
    blocks = int(
        json.loads((result.output_dir / "checkpoints").glob("checkpoint-*/trainer_state.json").__next__().read_text())[
            "train_examples"
        ]
    )
    assert result.metrics["steps"] == math.ceil(0.05 * (blocks // 8))


@pytest.mark.parametrize("segments", [2, 1])
def test_two_segment_blocks_train_the_second_token_type(tmp_path, corpus_dir, wordpiece_dir, segments):
    """Sentence-pair fine-tuning feeds token type 1: two-segment blocks (the default) train its
    embedding row; one-segment blocks leave it as initialised (weight decay off to see it exactly)."""
    from transformers import BertConfig, BertForMaskedLM

    from toolkit.tokenizer import load_tokenizer

    start = tmp_path / "start"
    config = BertConfig(vocab_size=len(load_tokenizer(wordpiece_dir)), **TINY_MODEL)
    torch.manual_seed(0)
    BertForMaskedLM(config).save_pretrained(start)
    initial = BertForMaskedLM.from_pretrained(start).bert.embeddings.token_type_embeddings.weight.detach().clone()
    recipe = tiny_bert_recipe(
        tmp_path / "out", corpus_dir, wordpiece_dir, max_steps=3, weight_decay=0.0, eval_on_start=False
    )
    recipe["model"] = {"model_name_or_path": str(start)}
    recipe["data"]["segments"] = segments
    result = toolkit.pretrain(recipe)
    trained = result.model.bert.embeddings.token_type_embeddings.weight.detach()
    assert not torch.equal(trained[0], initial[0])  # type 0 trains either way
    card = (result.output_dir / "README.md").read_text()
    if segments == 2:
        assert (trained[1] - initial[1]).abs().max() > 1e-3
        assert "`[CLS] A [SEP] B [SEP]`" in card
    else:
        assert torch.equal(trained[1], initial[1])
        assert "[SEP] B" not in card
