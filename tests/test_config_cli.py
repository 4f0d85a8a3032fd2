"""Recipes, overrides, CLI help and the bad-input contract (one clear line, exit 2, nothing written)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, run_cli, tiny_bert_recipe

from toolkit.cli import main as cli_main
from toolkit.config import PretrainRecipe, all_keys, parse_overrides, resolve
from toolkit.errors import ToolkitError

PUBLIC_PRETRAIN_KEYS = """output_dir model.architecture model.size model.model_name_or_path model.config_overrides
tokenizer.path data.train_files data.validation_files data.max_seq_length objective.name
objective.mlm_probability training.max_steps training.per_device_train_batch_size
training.gradient_accumulation_steps training.learning_rate training.lr_scheduler_type training.warmup_steps
training.mixed_precision training.seed training.eval_steps training.save_steps
training.resume_from_checkpoint""".split()


def recipe_files() -> list[Path]:
    return sorted(p for p in (REPO / "recipes").rglob("*") if p.suffix in (".yaml", ".yml", ".json"))


def test_public_keys_exist():
    assert set(PUBLIC_PRETRAIN_KEYS) <= set(all_keys(PretrainRecipe))


@pytest.mark.parametrize("path", recipe_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_recipe_parses_and_validates(path):
    from toolkit.recipes import validate_file

    validate_file(path)  # raises on any problem


def test_recipe_folder_is_walked_recursively():
    """The walk that parametrises the test above finds every recipe file at every depth, compared with a
    listing of the folder made here: a top-level glob would miss the launch configs in recipes/accelerate/
    and the DeepSpeed files in recipes/accelerate/deepspeed/."""
    root = REPO / "recipes"
    listed = sorted(
        Path(folder) / name
        for folder, _, names in os.walk(root)
        for name in names
        if name.endswith((".yaml", ".yml", ".json"))
    )
    walked = recipe_files()
    assert walked == listed
    relative = {p.relative_to(root).as_posix() for p in walked}
    assert {"bert-mlm.yaml", "accelerate/multi-cpu.yaml", "accelerate/deepspeed/zero3.json"} <= relative
    assert {len(p.relative_to(root).parts) for p in walked} == {1, 2, 3}


def test_overrides_are_parsed_as_yaml_and_win_over_the_file():
    tree = parse_overrides(["training.max_steps=20", "data.train_files=[a.txt,b.txt]", "model.config_overrides={x: 1}"])
    assert tree == {
        "training": {"max_steps": 20},
        "data": {"train_files": ["a.txt", "b.txt"]},
        "model": {"config_overrides": {"x": 1}},
    }
    r = resolve(
        PretrainRecipe, REPO / "recipes" / "bert-mlm.yaml", ["training.max_steps=7", "training.learning_rate=1e-4"]
    )
    assert r.training.max_steps == 7 and r.training.learning_rate == 1e-4
    assert r.model.architecture == "bert"  # from the file
    assert r.training.per_device_eval_batch_size == 64  # a default


@pytest.mark.parametrize(
    "override, message",
    [
        ("training.max_step=3", "did you mean 'training.max_steps'"),
        ("trainig.max_steps=3", "did you mean 'training'"),
        ("training.max_steps=abc", "'training.max_steps' must be of type int"),
        ("model.architecture=bret", "did you mean 'bert'"),
        ("objective.name=mlmm", "did you mean 'mlm'"),
        ("objective.name=clm", "cannot train model.architecture 'bert'"),
        ("training.mixed_precision=fp8", "unknown training.mixed_precision"),
        ("objective.mlm_probability=1.5", "between 0 and 1"),
        ("objective.masking=fixed", "did you mean 'fixed_count'"),
        ("objective.max_predictions_per_seq=0", "max_predictions_per_seq=0 must be at least 1"),
        ("objective.max_predictions_per_seq=2.5", "'objective.max_predictions_per_seq' must be of type int"),
        ("model.size=huge", "unknown model.size"),
        ("data.train_files=[]", "data.train_files is empty"),
        ("training.max_eval_batches=0", "training.max_eval_batches must be at least 1, or null"),
    ],
)
def test_bad_recipe_values_fail_with_a_clear_message(override, message):
    with pytest.raises(ToolkitError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve(PretrainRecipe, REPO / "recipes" / "bert-mlm.yaml", [override])


def test_yaml_booleans_in_text_fields_read_as_the_word_typed(tmp_path, capsys):
    """YAML 1.1 reads an unquoted `no`/`off` as false and `yes`/`on` as true: `training.mixed_precision=no`
    (accelerate's spelling) works on the command line and in a file, and a choice that has no such word
    still gets its own clear error rather than a type error."""

    def dry_run(*args) -> tuple[int, dict | None, str]:
        code = cli_main(["pretrain", *args, "--dry-run"])
        out, err = capsys.readouterr()
        return code, yaml.safe_load(out) if code == 0 else None, err

    bert_mlm = REPO / "recipes" / "bert-mlm.yaml"
    for typed in ("no", "off", "NO"):
        code, resolved, err = dry_run(
            str(bert_mlm), "training.mixed_precision=bf16", f"training.mixed_precision={typed}"
        )
        assert code == 0, err
        assert resolved["training"]["mixed_precision"] == "no"

    text = bert_mlm.read_text()
    assert '  mixed_precision: "no"' in text
    unquoted = tmp_path / "unquoted.yaml"
    unquoted.write_text(text.replace('  mixed_precision: "no"', "  mixed_precision: no"))
    assert yaml.safe_load(unquoted.read_text())["training"]["mixed_precision"] is False  # what YAML itself reads
    code, resolved, err = dry_run(str(unquoted))
    assert code == 0, err
    assert resolved["training"]["mixed_precision"] == "no"

    code, _, err = dry_run(str(bert_mlm), "training.mixed_precision=yes")
    assert code == 2 and "error: unknown training.mixed_precision 'yes'" in err
    code, _, err = dry_run(str(bert_mlm), "tokenizer.kind=off")  # a `str | None` field
    assert code == 2 and "error: unknown tokenizer.kind 'no'" in err
    code = cli_main(["finetune", str(REPO / "recipes" / "finetune-full.yaml"), "finetune.mode=no", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and "error: unknown finetune.mode 'no'" in err and "must be of type" not in err
    # boolean fields stay booleans
    assert resolve(PretrainRecipe, bert_mlm, ["training.eval_on_start=no"]).training.eval_on_start is False


def test_help_is_instant_and_documents_commands():
    from toolkit.cli import RECIPE_VERBS, build_parser

    commands = sorted(build_parser()._subparsers._group_actions[0].choices)
    assert {v.name for v in RECIPE_VERBS} <= set(commands) and {"predict", "tokenizer", "evaluate"} <= set(commands)
    for args in (["--help"], *([c, "--help"] for c in commands)):
        start = time.perf_counter()
        proc = run_cli(*args)
        assert proc.returncode == 0 and "usage: toolkit" in proc.stdout, args
        assert time.perf_counter() - start < 5  # no torch import behind --help
    for verb in RECIPE_VERBS:
        text = run_cli(verb.name, "--help").stdout
        assert "key=value" in text and "--help-recipe" in text and "--dry-run" in text


def test_help_recipe_lists_every_key_with_its_default_and_help(capsys):
    import importlib

    from toolkit.cli import RECIPE_VERBS
    from toolkit.cli import main as cli_main
    from toolkit.config import help_text

    for verb in RECIPE_VERBS:
        module, name = verb.recipe_class.split(":")
        cls = getattr(importlib.import_module(module), name)
        assert cli_main([verb.name, "--help-recipe"]) == 0
        printed = capsys.readouterr().out
        rows = help_text(cls)
        assert len(rows) > 20
        for key, text, _ in rows:
            assert f"  {key} = " in printed, (verb.name, key)
            assert text.split()[0] in printed
    assert cli_main(["pretrain", "--help-recipe"]) == 0
    assert "  training.max_steps = -1\n      Optimizer steps to train for" in capsys.readouterr().out


def test_a_recipe_verb_without_a_recipe_says_which_to_give(capsys):
    from toolkit.cli import main as cli_main

    assert cli_main(["pretrain"]) == 2
    assert "give a recipe file, e.g. toolkit pretrain recipes/bert-mlm.yaml" in capsys.readouterr().err


def _bad_run(tmp_path, *overrides, files=None):
    out = tmp_path / "out"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_bert_recipe(out, files or tmp_path)))
    proc = run_cli("pretrain", str(recipe), *overrides)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1
    assert not out.exists()  # nothing half-written
    return lines[0]


def test_missing_file(tmp_path):
    assert "file not found" in _bad_run(tmp_path, f"data.train_files=[{tmp_path}/nope.txt]")


def test_empty_file(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    assert "is empty" in _bad_run(tmp_path, f"data.train_files=[{tmp_path}/empty.txt]")


def test_binary_file(tmp_path):
    (tmp_path / "model.bin").write_bytes(bytes(range(256)) * 100)
    assert "not UTF-8 text" in _bad_run(tmp_path, f"data.train_files=[{tmp_path}/model.bin]")


def test_corpus_too_small_for_one_block_from_the_cli(tmp_path, wordpiece_dir):
    (tmp_path / "tiny.txt").write_text("a few words only\n\nand a second tiny document\n\nthird one")
    msg = _bad_run(
        tmp_path,
        f"data.train_files=[{tmp_path}/tiny.txt]",
        f"tokenizer.path={wordpiece_dir}",
        "data.validation_split_percentage=0",
    )
    assert "fewer than one block" in msg


def test_unknown_architecture_and_objective_from_the_cli(tmp_path):
    assert "unknown model.architecture" in _bad_run(tmp_path, "model.architecture=lstm")
    assert "unknown objective.name" in _bad_run(tmp_path, "objective.name=span")


def test_missing_recipe_file(tmp_path):
    proc = run_cli("pretrain", str(tmp_path / "nope.yaml"))
    assert proc.returncode == 2 and "recipe file not found" in proc.stderr


def test_an_existing_run_is_not_overwritten(tmp_path, corpus_dir, wordpiece_dir):
    import toolkit

    recipe = tiny_bert_recipe(tmp_path / "run", corpus_dir, wordpiece_dir, max_steps=2)
    toolkit.pretrain(recipe)
    with pytest.raises(ToolkitError, match="already holds a run"):
        toolkit.pretrain(recipe)


def test_tokenizer_and_evaluate_commands(tmp_path, corpus_dir):
    proc = run_cli(
        "tokenizer",
        "--files",
        str(corpus_dir),
        "--kind",
        "bpe",
        "--vocab-size",
        "500",
        "--output",
        str(tmp_path / "tok"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert len(tok) == 500 and tok.decode(tok("Wherefore art thou")["input_ids"]) == "Wherefore art thou"

    import toolkit

    result = toolkit.pretrain(tiny_bert_recipe(tmp_path / "m", corpus_dir, max_steps=3, eval_on_start=False))
    proc = run_cli(
        "evaluate",
        "--model",
        str(result.output_dir),
        "--files",
        str(corpus_dir / "hamlet_gut.txt"),
        "--max-seq-length",
        "32",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert metrics["objective"] == "mlm" and metrics["blocks"] > 10
    assert 0 < metrics["loss"] < 10 and metrics["perplexity"] > 1
