"""kill -9 during a run with a checkpoint every step, then `auto`: the final weights equal those of the
uninterrupted run, every time.

The default tier kills at named stages of a save (the `TOOLKIT_FAULT_KILL_AT` hook that
`checkpoint.save` reads); the slow tier kills 20 runs with a timer at random moments (start-up, data,
training, a save, the final publish) and with random save stages.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import REPO, tiny_bert_recipe

import toolkit
from toolkit.engine import checkpoint

STEPS = 6


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus_dir, wordpiece_dir):
    """The uninterrupted run: (recipe, its final weights, seconds)."""
    root = tmp_path_factory.mktemp("fault")
    recipe = tiny_bert_recipe(
        root / "reference",
        corpus_dir,
        wordpiece_dir,
        max_steps=STEPS,
        save_steps=1,
        save_total_limit=2,
        max_eval_batches=1,
        logging_steps=1,
    )
    started = time.perf_counter()
    toolkit.pretrain(recipe)
    return recipe, weights(root / "reference"), time.perf_counter() - started


def weights(out) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "model.safetensors")


def trial(reference, folder, kill_at: str | None = None, after: float | None = None) -> tuple[bool, str]:
    """Run the CLI until killed (at a save stage, or after `after` seconds), resume with auto (in this
    process, to save a start-up), compare the final weights exactly."""
    recipe, expected, _ = reference
    recipe = {**recipe, "output_dir": str(folder / "run")}
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if kill_at:
        env[checkpoint.FAULT_ENV] = kill_at
    proc = subprocess.Popen(
        [sys.executable, "-m", "toolkit", "pretrain", str(path)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    if after is not None:
        try:
            proc.wait(timeout=after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    rc = proc.wait(timeout=600)
    try:
        toolkit.pretrain(recipe, training__resume_from_checkpoint="auto")
    except Exception as e:  # counted as a failed trial, reported with the others
        return False, f"killed rc {rc}, resume failed: {type(e).__name__}: {e}"
    got = weights(folder / "run")
    same = got.keys() == expected.keys() and all(bool((got[k] == expected[k]).all()) for k in expected)
    valid = all(checkpoint.problem(p) is None for _, p in checkpoint.complete_checkpoints(folder / "run"))
    return same and valid, f"killed rc {rc}; weights equal: {same}; checkpoints valid: {valid}"


def report(name: str, results: list[tuple[bool, str]]) -> None:
    passed = sum(ok for ok, _ in results)
    print(f"\n{name}: {len(results)} trials, {passed} passed")
    for ok, note in results:
        if not ok:
            print("  FAILED:", note)


def test_kill_at_save_stages_then_auto_equals_the_uninterrupted_run(reference, tmp_path):
    stages = ["before_manifest@3", "after_rename@4"]  # a half-written checkpoint; a complete one not yet rotated
    results = []
    for i, stage in enumerate(stages):
        (tmp_path / str(i)).mkdir()
        results.append(trial(reference, tmp_path / str(i), kill_at=stage))
    report("kill -9 at save stages", results)
    assert all(ok for ok, _ in results), results


@pytest.mark.slow
def test_kill_at_random_moments_twenty_times(reference, tmp_path):
    _, _, seconds = reference
    results = []
    for seed in range(20):
        rng = random.Random(seed)
        (tmp_path / str(seed)).mkdir()
        if seed % 2:  # a random stage of a random save
            stage = f"{rng.choice(checkpoint.STAGES)}@{rng.randint(1, STEPS)}"
            results.append(trial(reference, tmp_path / str(seed), kill_at=stage))
        else:  # a random moment of the whole run, start-up included
            results.append(trial(reference, tmp_path / str(seed), after=rng.uniform(0.2, 1.0) * seconds))
        print(f"trial {seed}: {'passed' if results[-1][0] else 'FAILED'} ({results[-1][1]})", flush=True)
    report("kill -9 at random moments", results)
    assert all(ok for ok, _ in results), results
