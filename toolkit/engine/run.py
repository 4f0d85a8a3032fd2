"""The run harness: everything around the training loop, written once for every kind of run.

    check the output folder and the resume point        (before any work; nothing written yet)
    accelerator and seed
    the caller's set-up: data, model, objective         (`setup(accelerator, resume) -> Setup`)
    train                                               (`engine.loop.train`, checkpoints with recipe.yaml)
    after-training evaluation                           (`Setup.after_train`, e.g. a test split)
    gather the full state dict, wait for every process
    publish the final folder: model, tokenizer, recipe.yaml, results.json, model card, report.png

Pretraining, fine-tuning, compression (recovery fine-tuning, distillation) and the runs built on them
all call `run()`; what differs between them is only what `setup` builds and how the model is saved.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from toolkit.engine import checkpoint, outputs
from toolkit.errors import ToolkitError

RESULTS_FILE = "results.json"


@dataclass
class Setup:
    """What the caller builds once the accelerator exists."""

    objective: object  # a toolkit Objective (an nn.Module): what the engine trains
    tokenizer: object
    train_data: object
    eval_data: object | None = None
    # after training, with the prepared model: extra metrics (e.g. the test split's), merged into the results
    after_train: Callable[[object, object, object], dict] | None = None
    # writes the trained model into the final folder: (folder, unwrapped objective, full state dict)
    save_model: Callable[[Path, object, dict | None], None] | None = None
    # writes the model card into the final folder: (folder, final metrics)
    write_card: Callable[[Path, dict], None] | None = None
    # extra files for the final folder: (folder, final metrics)
    write_outputs: Callable[[Path, dict], None] | None = None
    train_context: contextlib.AbstractContextManager = field(default_factory=contextlib.nullcontext)
    metrics: dict = field(default_factory=dict)  # facts known before training (parameter counts...)


@dataclass
class Outcome:
    """A finished run, on every process (only the main process wrote the folder)."""

    output_dir: Path
    metrics: dict
    model: object  # the trained transformers model (the objective's `.model`), in memory
    objective: object  # the unwrapped objective
    is_main: bool = True


def run(
    recipe,
    setup: Callable[[object, Path | None], Setup],
    *,
    training=None,
    output_dir: str | Path | None = None,
    name: str = "train",
    checks: Callable[[], None] | None = None,
) -> Outcome:
    """Train what `setup` builds, under the launch this process belongs to, and publish the result.

    `recipe` is written as recipe.yaml beside every checkpoint and into the final folder; `training`
    and `output_dir` default to its `training` section and `output_dir`. `checks` runs the caller's
    input checks right after the output folder's, before any expensive work."""
    from accelerate.utils import set_seed

    from toolkit.config import to_dict, to_yaml
    from toolkit.engine.distributed import full_state_dict
    from toolkit.engine.loop import Job, make_accelerator, train

    t = training if training is not None else recipe.training
    out = Path(output_dir if output_dir is not None else recipe.output_dir)
    # ---- every check that can fail on user input runs before any work or any file is written -------
    resume = outputs.prepare(out, t)  # writable, the checkpoint to resume from, no mixing of runs
    if checks is not None:
        checks()

    accelerator = make_accelerator(t, out)
    set_seed(t.seed)
    main = accelerator.is_main_process
    built = setup(accelerator, resume)

    out.mkdir(parents=True, exist_ok=True)
    if resume is None and t.overwrite_output_dir and main:
        for p in ("checkpoints", "runs", "metrics.jsonl"):
            target = out / p
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
    accelerator.wait_for_everyone()

    def write_extras(folder: Path) -> None:  # beside every checkpoint and in the final folder
        (folder / "recipe.yaml").write_text(to_yaml(recipe))
        built.tokenizer.save_pretrained(str(folder))

    job = Job(
        objective=built.objective,
        tokenizer=built.tokenizer,
        train_data=built.train_data,
        eval_data=built.eval_data,
        training=t,
        output_dir=out,
        write_extras=write_extras,
        tracker_config=flat(to_dict(recipe)),
        name=name,
    )
    with built.train_context:
        history, model = train(job, accelerator, resume)
        extra = built.after_train(model, accelerator, job) if built.after_train else {}

    # ---- outputs: an ordinary Hugging Face folder + tokenizer, recipe, results, model card ----------
    metrics = {**final_metrics(history), **built.metrics, **extra}
    state_dict = full_state_dict(accelerator, model)  # ZeRO-3 / FSDP shards gathered; fp32 under DeepSpeed
    objective = accelerator.unwrap_model(model)
    if main:

        def write_final(folder: Path) -> None:
            if built.save_model is not None:
                built.save_model(folder, objective, state_dict)
            else:
                objective.save_pretrained(folder, state_dict=state_dict)
            write_extras(folder)
            if built.write_outputs is not None:
                built.write_outputs(folder, metrics)
            (folder / RESULTS_FILE).write_text(json.dumps(metrics, indent=2, default=str) + "\n")
            if built.write_card is not None:
                built.write_card(folder, metrics)

        publish(out, write_final)
        draw_report(out)
    accelerator.wait_for_everyone()
    end_training(accelerator)
    return Outcome(output_dir=out, metrics=metrics, model=objective.model, objective=objective, is_main=main)


def end_training(accelerator) -> None:
    """Finish the run's trackers. The process group stays up until the process exits: under `accelerate
    launch` a process may run several jobs (a comparison of modes, a study), and `Accelerator.end_training`
    would destroy the group under the next one."""
    import atexit

    for tracker in accelerator.trackers:
        tracker.finish()
    atexit.unregister(destroy_process_group)  # registered once, however many runs
    atexit.register(destroy_process_group)


def destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def draw_report(out: Path) -> Path | None:
    """report.png of the run (loss, learning rate, throughput, FLOPs) from its metrics.jsonl; a run that
    logged nothing to draw (no training step) says so instead."""
    from toolkit.report import write_report

    try:
        return write_report(out)
    except ToolkitError as e:
        print(f"no report.png: {e}")
        return None


def publish(out: Path, write: Callable[[Path], None]) -> None:
    """Write the final files into a temporary folder, then move them into place (main process only)."""
    tmp = out / ".tmp-final"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    checkpoint.follow_umask(tmp)  # safetensors writes its files 0600
    for entry in sorted(tmp.iterdir()):
        target = out / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        entry.replace(target)
    tmp.rmdir()


RUN_FACTS = ("steps", "tokens_seen", "train_flops", "train_seconds", "world_size", "engine", "optimizer")
RUN_FACTS += ("skipped_nonfinite_steps", "skipped_loss_scaler_steps", "tensor_parallel_size", "pipeline_parallel_size")


def final_metrics(history: dict) -> dict:
    """The results of a run: its facts, the last training interval (`train_*`), the final validation
    (`eval_*`) and the validation before training (`initial_eval_*`)."""
    metrics = {k: history[k] for k in RUN_FACTS if k in history}
    metrics.update({f"train_{k}": v for k, v in history.get("train", {}).items()})
    metrics.update({f"eval_{k}": v for k, v in history.get("eval", {}).items()})
    metrics.update({f"initial_eval_{k}": v for k, v in history.get("initial", {}).items()})
    return metrics


def flat(tree: dict, prefix: str = "") -> dict:
    """A nested recipe as flat `section.key` values a tracker can store."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def metrics_summary(output_dir, metrics: dict, note: str = "") -> str:
    """Validation metrics before -> after training, and the test figure where there is one: the lines a
    command prints at the end of a run (every `eval_*` metric; no metric names are listed here)."""
    lines = [f"\nsaved to {output_dir}" + (f" ({note})" if note else "")]
    for key in sorted(k[len("eval_") :] for k in metrics if k.startswith("eval_")):
        after = metrics[f"eval_{key}"]
        if not isinstance(after, (int, float)) or key.endswith(("_seconds", "_runtime")):
            continue
        before, test = metrics.get(f"initial_eval_{key}"), metrics.get(f"test_{key}")
        prefix = f"{before:.4f} -> " if isinstance(before, (int, float)) else ""
        suffix = f"   test: {test:.4f}" if isinstance(test, (int, float)) else ""
        lines.append(f"validation {key}: {prefix}{after:.4f}{suffix}")
    return "\n".join(lines)
