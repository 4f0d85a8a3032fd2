"""Checkpoints that never lose work, output folders checked first, a full disk reported clearly.

Every run here is a tiny BERT for a few steps; a module-scoped run with checkpoints at steps 2 and 4
is copied by the tests that damage it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_bert_recipe

import toolkit
from toolkit.engine import checkpoint, outputs
from toolkit.engine.tracking import read_metrics
from toolkit.errors import ToolkitError

CKPT_FILES = {
    "custom_checkpoint_0.pkl",
    "manifest.json",
    "model.safetensors",
    "optimizer.bin",
    "random_states_0.pkl",
    "recipe.yaml",
    "tokenizer.json",
    "tokenizer_config.json",
    "trainer_state.json",
}


def recipe_for(out, corpus_dir, wordpiece_dir, **training):
    settings = dict(max_steps=4, save_steps=2, save_total_limit=2, max_eval_batches=1)
    return tiny_bert_recipe(out, corpus_dir, wordpiece_dir, **{**settings, **training})


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, corpus_dir, wordpiece_dir):
    """An uninterrupted 4-step run with checkpoints 2 and 4: (recipe, output_dir, final weights)."""
    out = tmp_path_factory.mktemp("base") / "run"
    recipe = recipe_for(out, corpus_dir, wordpiece_dir)
    toolkit.pretrain(recipe)
    return recipe, out, weights(out)


def weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "model.safetensors")


def copy_run(base_run, dest: Path) -> tuple[dict, Path]:
    recipe, out, _ = base_run
    shutil.copytree(out, dest)
    return {**recipe, "output_dir": str(dest)}, dest


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def corrupt(path: Path, how: str) -> None:
    if how == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "delete":
        path.unlink()
    else:  # flip one byte in the middle
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


# ---- defect 2: a corrupt newest checkpoint ---------------------------------------------------------


def test_checkpoint_folder_holds_a_manifest_of_every_file(base_run):
    _, out, _ = base_run
    folder = out / "checkpoints" / "checkpoint-4"
    assert {p.name for p in folder.iterdir()} == CKPT_FILES
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["files"]) == CKPT_FILES - {"manifest.json"}
    assert manifest["step"] == 4 and manifest["sequence"] == 2
    assert checkpoint.problem(folder) is None


def test_auto_skips_the_newest_checkpoint_however_it_is_damaged(base_run, tmp_path):
    _, out = copy_run(base_run, tmp_path / "run")
    newest = out / "checkpoints" / "checkpoint-4"
    trials = passed = 0
    for name in sorted(CKPT_FILES):
        for how in ("truncate", "delete", "flip"):
            path = newest / name
            saved = path.read_bytes()
            corrupt(path, how)
            picked, note = checkpoint.plan_resume(out, "auto")
            trials += 1
            passed += picked == out / "checkpoints" / "checkpoint-2" and "checkpoint-4" in note
            path.write_bytes(saved)
    print(f"\ncorrupt newest checkpoint: {passed}/{trials} damaged copies skipped, the previous one picked")
    assert (trials, passed) == (27, 27)
    assert checkpoint.plan_resume(out, "auto")[0] == newest  # restored: valid again


def test_auto_falls_back_past_a_corrupt_checkpoint_and_finishes_like_an_uninterrupted_run(base_run, tmp_path, capsys):
    recipe, out = copy_run(base_run, tmp_path / "run")
    corrupt(out / "checkpoints" / "checkpoint-4" / "model.safetensors", "truncate")
    (out / "model.safetensors").unlink()  # as after a crash before the final save
    result = toolkit.pretrain(recipe, training__resume_from_checkpoint="auto")
    err = capsys.readouterr().err
    assert "resuming from" in err and "checkpoint-2" in err and "checkpoint-4: model.safetensors has" in err
    assert result.metrics["steps"] == 4
    assert_same_weights(weights(out), base_run[2])
    # resumed part-way, the "before" numbers are still known (kept in the checkpoint state)
    assert result.metrics["initial_eval_loss"] == read_metrics(base_run[1])[0]["eval_loss"]
    # the damaged folder is kept aside, not deleted, and no longer reachable by auto
    aside = list((out / "checkpoints").glob("abandoned-*/checkpoint-4"))
    assert len(aside) == 1 and checkpoint.problem(aside[0]) is not None
    assert [s for s, _ in checkpoint.complete_checkpoints(out)] == [2, 4]


def test_an_explicit_invalid_checkpoint_is_refused_with_one_clear_error(base_run, tmp_path):
    _, out = copy_run(base_run, tmp_path / "run")
    folder = out / "checkpoints" / "checkpoint-4"
    (folder / "optimizer.bin").unlink()
    with pytest.raises(ToolkitError, match=r"not a complete checkpoint \(optimizer.bin is missing\)"):
        checkpoint.plan_resume(out, str(folder))


# ---- defect 1: resuming from an older checkpoint, then rotation --------------------------------------


def test_resuming_an_older_checkpoint_sets_the_newer_aside_and_rotation_keeps_the_new_history(
    base_run, tmp_path, capsys
):
    recipe, out = copy_run(base_run, tmp_path / "run")
    older = out / "checkpoints" / "checkpoint-2"
    toolkit.pretrain(recipe, training__max_steps=3, training__resume_from_checkpoint=str(older))
    assert "moved checkpoint-4 to" in capsys.readouterr().err
    # the resumed run's checkpoints are the ones kept (save_total_limit=2), in its own order
    assert [s for s, _ in checkpoint.complete_checkpoints(out)] == [2, 3]
    assert checkpoint.sequence(out / "checkpoints" / "checkpoint-3") == checkpoint.sequence(older) + 1
    assert checkpoint.plan_resume(out, "auto")[0] == out / "checkpoints" / "checkpoint-3"
    # the abandoned run's newer checkpoint is kept whole, out of auto's reach
    aside = list((out / "checkpoints").glob("abandoned-*/checkpoint-4"))
    assert len(aside) == 1 and checkpoint.problem(aside[0]) is None


def test_rotation_orders_by_save_sequence_not_step(tmp_path):
    """A checkpoint with a higher step but an older sequence number is the one rotated away."""

    class Single:
        is_main_process = True
        _models: list = []

        def wait_for_everyone(self):
            pass

        def save_state(self, folder):
            (Path(folder) / "model.safetensors").write_bytes(b"weights")

    acc, out = Single(), tmp_path / "run"
    for step, seq in ((9, 1), (2, 2), (3, 3)):
        checkpoint.save(acc, out, step, {"step": step}, lambda f: None, keep=2, seq=seq)
    assert [s for s, _ in checkpoint.complete_checkpoints(out)] == [2, 3]


# ---- defect 3: a crash before the first checkpoint, then auto ---------------------------------------


def test_auto_with_no_valid_checkpoint_starts_fresh_in_that_folder(tmp_path, corpus_dir, wordpiece_dir, capsys):
    out = tmp_path / "run"
    (out / "checkpoints" / ".tmp-checkpoint-2").mkdir(parents=True)  # what a crash mid-save leaves
    (out / "checkpoints" / "checkpoint-2").mkdir()  # a checkpoint without a manifest
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 7.0}\n')
    recipe = recipe_for(out, corpus_dir, wordpiece_dir, max_steps=2, save_steps=0)
    with pytest.raises(ToolkitError, match="already holds a run"):
        toolkit.pretrain(recipe)  # without auto, the old run is protected
    result = toolkit.pretrain(recipe, training__resume_from_checkpoint="auto")
    err = capsys.readouterr().err
    assert "no valid checkpoint" in err and "starting a fresh run" in err
    assert result.metrics["steps"] == 2
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert checkpoint.problem(out / "checkpoints" / "checkpoint-2") is None
    assert len(list((out / "checkpoints").glob("abandoned-*/checkpoint-2"))) == 1


def test_check_output_dir_rules(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ToolkitError, match="already holds a run"):
        outputs.check_output_dir(tmp_path, None, overwrite=False, spec=None)
    outputs.check_output_dir(tmp_path, None, overwrite=False, spec="auto")  # nothing valid: fresh start
    outputs.check_output_dir(tmp_path, None, overwrite=True, spec=None)
    outputs.check_output_dir(tmp_path / "new", None, overwrite=False, spec=None)


# ---- defect 5: an output_dir that cannot be written ------------------------------------------------


def test_output_dir_that_is_a_file_is_refused_before_anything_else(tmp_path, corpus_dir):
    (tmp_path / "taken").write_text("a file")
    recipe = tiny_bert_recipe(tmp_path / "taken", corpus_dir)
    recipe["data"]["train_files"] = [str(tmp_path / "missing.txt")]  # checked later: must not be reached
    with pytest.raises(ToolkitError, match="is a file, not a folder"):
        toolkit.pretrain(recipe)
    with pytest.raises(ToolkitError, match="cannot be created"):
        outputs.check_writable(tmp_path / "taken" / "sub")


@pytest.fixture
def mounted(tmp_path):
    """A small tmpfs at tmp_path/disk (root only); mount options given by the test."""
    made = []

    def mount(options: str) -> Path:
        where = tmp_path / f"disk{len(made)}"
        where.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
        made.append(where)
        return where

    yield mount
    for where in made:
        subprocess.run(["umount", str(where)], capture_output=True)


def test_read_only_output_dir_is_refused_with_one_line(mounted):
    disk = mounted("size=1m,ro")
    with pytest.raises(ToolkitError, match="read-only"):
        outputs.check_writable(disk / "out")


# ---- defect 6: a full disk during a checkpoint --------------------------------------------------------


def _after_full_disk(out: Path) -> None:
    assert not list((out / "checkpoints").glob(".tmp-*"))  # no partial folder left
    assert [s for s, _ in checkpoint.complete_checkpoints(out)] == [2]
    assert checkpoint.problem(out / "checkpoints" / "checkpoint-2") is None  # the previous one is valid


def test_full_disk_is_foreseen_before_a_checkpoint_is_written(mounted, corpus_dir, wordpiece_dir):
    out = mounted("size=3m") / "run"  # room for one checkpoint (2.1 MB) but not two
    with pytest.raises(ToolkitError, match=r"not enough free space to write checkpoint .*checkpoint-4"):
        toolkit.pretrain(recipe_for(out, corpus_dir, wordpiece_dir, save_total_limit=1))
    _after_full_disk(out)


def test_disk_filling_up_during_a_save_is_one_clear_error(mounted, corpus_dir, wordpiece_dir, monkeypatch):
    out = mounted("size=3m") / "run"
    monkeypatch.setattr(checkpoint, "free_bytes", lambda path: 1 << 40)  # the estimate is fooled
    with pytest.raises(ToolkitError, match=r"the disk is full: checkpoint .*checkpoint-4 could not be written"):
        toolkit.pretrain(recipe_for(out, corpus_dir, wordpiece_dir, save_total_limit=1))
    _after_full_disk(out)


# ---- defect 7: verbs that would answer from random weights ------------------------------------------


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory, wordpiece_dir) -> Path:
    """A sequence classifier folder (labels neg/pos) with the toolkit's tokenizer: what finetune writes."""
    from conftest import TINY_MODEL
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    out = tmp_path_factory.mktemp("clf") / "model"
    tokenizer = AutoTokenizer.from_pretrained(wordpiece_dir)
    config = BertConfig(
        vocab_size=len(tokenizer), id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1}, **TINY_MODEL
    )
    BertForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_evaluate_refuses_a_classifier_and_too_long_sequences(classifier_dir, base_run, corpus_dir):
    with pytest.raises(ToolkitError, match=r"BertForSequenceClassification, not a masked language model.*cls\."):
        toolkit.evaluate(classifier_dir, [str(corpus_dir)], max_seq_length=32)
    with pytest.raises(ToolkitError, match="more than .* has positions for \\(512\\)"):
        toolkit.evaluate(base_run[1], [str(corpus_dir)], max_seq_length=513)
    scores = toolkit.evaluate(base_run[1], [str(corpus_dir)], max_seq_length=32)  # a real MLM still scores
    assert 0 < scores["loss"] < 10


def test_predict_refuses_a_pretrained_folder_and_unknown_labels(classifier_dir, base_run, tmp_path):
    rows = tmp_path / "rows.csv"
    rows.write_text("text,label\nthe king is good,pos\nthe lord is vile,neg\n")
    with pytest.raises(ToolkitError, match=r"BertForMaskedLM, not a fine-tuned classifier.*classifier"):
        toolkit.predict(base_run[1], str(rows), tmp_path / "p.csv")
    path, scores = toolkit.predict(classifier_dir, str(rows), tmp_path / "p.csv")
    assert set(scores) >= {"accuracy"} and len(path.read_text().splitlines()) == 3
    rows.write_text("text,label\nthe king is good,pos\nthe lord is vile,maybe\n")
    with pytest.raises(ToolkitError, match=r"labels the model does not know \('maybe'"):
        toolkit.predict(classifier_dir, str(rows), tmp_path / "p.csv")


# ---- defect 4: bad bytes deep in a corpus ---------------------------------------------------------------


def test_bad_bytes_deep_in_a_corpus_are_located(tmp_path, capsys):
    from toolkit.data.corpus import load_documents

    text = tmp_path / "deep.txt"
    text.write_bytes(b"hello world\n\n" * 10_000 + b"bad \xff bytes\n")  # past the first 64 KB
    with pytest.raises(ToolkitError, match=r"deep.txt' as text, line 20001 \(byte 130004\): invalid UTF-8"):
        load_documents([text], "text", "blank_line")
    lines = tmp_path / "rows.jsonl"
    lines.write_text("".join(f'{{"text": "row {i}"}}\n' for i in range(5000)) + '{"text": broken\n')
    with pytest.raises(ToolkitError, match=r"rows.jsonl' as json, line 5001 \(byte \d+\): not valid JSON"):
        load_documents([lines], "text", "blank_line")
    gz = tmp_path / "deep.txt.gz"
    import gzip

    gz.write_bytes(gzip.compress(text.read_bytes()))
    with pytest.raises(ToolkitError, match=r"line 20001 \(byte 130004\): invalid UTF-8"):
        load_documents([gz], "text", "blank_line")


def test_rows_without_the_text_field_are_counted_and_too_many_stop(tmp_path, capsys):
    from toolkit.data.corpus import load_documents

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(f'{{"text": "row {i}"}}\n' for i in range(19)) + '{"body": "elsewhere"}\n')
    docs = load_documents([path], "text", "blank_line")
    assert len(docs) == 19 and "1 of 20 rows (5.0%)" in capsys.readouterr().err
    with pytest.raises(ToolkitError, match=r"1 of 20 rows \(5.0%\).*more than data.max_missing_text_share=0.01"):
        load_documents([path], "text", "blank_line", max_missing_share=0.01)
    path.write_text('{"text": ["a", "list"]}\n')  # found by the fuzz test: a TypeError from datasets before
    with pytest.raises(ToolkitError, match="does not hold strings only"):
        load_documents([path], "text", "blank_line")


# ---- defect 8: the smaller ones ---------------------------------------------------------------------------


def test_saved_files_follow_the_umask(base_run):
    mask = os.umask(0)
    os.umask(mask)
    out = base_run[1]
    modes = {
        p.name: p.stat().st_mode & 0o777 for p in [*out.iterdir(), *(out / "checkpoints" / "checkpoint-4").iterdir()]
    }
    assert modes["model.safetensors"] == 0o666 & ~mask
    assert {m for name, m in modes.items() if name != "checkpoints"} == {0o666 & ~mask}


def test_a_run_recovered_at_its_final_step_past_a_torn_metrics_line_reports_its_metrics(base_run, tmp_path, capsys):
    recipe, out = copy_run(base_run, tmp_path / "run")
    for name in ("model.safetensors", "README.md"):  # a crash after the last checkpoint, before publishing
        (out / name).unlink()
    with (out / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 4, "eval_lo')  # torn by the crash
    result = toolkit.pretrain(recipe, training__resume_from_checkpoint="auto")
    assert "skipped a torn last line" in capsys.readouterr().err
    logged = read_metrics(base_run[1])
    assert result.metrics["initial_eval_loss"] == logged[0]["eval_loss"]
    assert result.metrics["train_loss"] == [m for m in logged if "loss" in m][-1]["loss"]
    assert result.metrics["eval_loss"] == pytest.approx(
        [m for m in logged if "eval_loss" in m][-1]["eval_loss"], abs=1e-6
    )
    card = (out / "README.md").read_text()
    assert f"| loss | {result.metrics['initial_eval_loss']:.4f} | {result.metrics['eval_loss']:.4f} |" in card
    assert_same_weights(weights(out), base_run[2])


def test_a_bad_metrics_line_in_the_middle_is_named(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ToolkitError, match="line 2 is not a JSON metrics line"):
        read_metrics(tmp_path)


def test_extending_a_finished_run_says_how_the_schedule_changes(base_run, tmp_path, capsys):
    recipe, out = copy_run(base_run, tmp_path / "run")
    toolkit.pretrain(recipe, training__max_steps=5, training__resume_from_checkpoint="auto")
    printed = capsys.readouterr().out
    assert "the run was planned for 4 steps and now runs to 5" in printed
    assert "schedule (linear) is recomputed over 5 steps" in printed


def test_files_given_on_the_command_line_replace_the_recipes_builtin_task():
    from toolkit.config import from_dict, merge, parse_overrides, read_yaml
    from toolkit.finetuning.config import FinetuneRecipe, drop_builtin_task_when_files_given

    data = read_yaml(REPO / "recipes" / "finetune-lora.yaml")
    overrides = parse_overrides(["task.train_file=reviews.csv", "task.label_field=stars"])
    with pytest.raises(ToolkitError, match="brings its own data"):  # what the README's example hit
        from_dict(FinetuneRecipe, merge(data, overrides)).validate()
    recipe = from_dict(FinetuneRecipe, merge(drop_builtin_task_when_files_given(data, overrides), overrides))
    recipe.validate()
    assert recipe.task.name is None and recipe.task.train_file == "reviews.csv"
    assert recipe.task.max_seq_length == 64  # the rest of the recipe's task section stays
    # a built-in task named on the command line, or no files given: nothing is dropped
    named = parse_overrides(["task.name=sms-spam", "task.train_file=x.csv"])
    assert drop_builtin_task_when_files_given(data, named)["task"]["name"] == "movie-sentiment"
    assert drop_builtin_task_when_files_given(data, {"training": {"seed": 1}}) is data
