"""Fine-tuning, end to end: recipe -> checks -> task data -> model in its mode -> engine -> outputs.

`finetune(recipe, **overrides)` is the public function behind `toolkit finetune`. It runs on the
same training engine as pretraining (so `accelerate launch`, checkpoints, exact resume and mixed
precision work the same), evaluates on the validation split during training and on the test split
at the end, and publishes an ordinary Hugging Face folder (a full model, or a PEFT adapter with its
base recorded) with the resolved recipe, metrics, test predictions and a model card.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from toolkit.config import load_recipe, merge, normalize_overrides, parse_overrides, to_dict, to_yaml
from toolkit.engine import outputs
from toolkit.finetuning.config import PEFT_MODES, POOLING_MODES, FinetuneRecipe

RESULTS_FILE = "results.json"
POOLING_FILE = "toolkit_pooling.py"


@dataclass
class FinetuneResult:
    output_dir: Path
    metrics: dict  # eval_* (validation, end), initial_eval_*, test_*, train stats, parameter counts
    model: object = None  # the trained transformers (or PEFT) model, in memory
    tokenizer: object = None


def resolve(recipe=None, overrides: list[str] | dict | None = None, **kwargs) -> FinetuneRecipe:
    """A validated FinetuneRecipe from a YAML path / dict / recipe plus overrides (as pretrain takes them)."""
    return load_recipe(FinetuneRecipe, recipe, combine_overrides(overrides, kwargs))


def combine_overrides(overrides, kwargs: dict) -> dict:
    merged = normalize_overrides(kwargs)
    if isinstance(overrides, list):
        merged = merge(parse_overrides(overrides), merged)
    elif overrides:
        merged = merge(normalize_overrides(overrides), merged)
    return merged


def finetune(recipe=None, overrides: list[str] | dict | None = None, **kwargs) -> FinetuneResult:
    """Fine-tune from a recipe (YAML path, dict or FinetuneRecipe) with optional overrides.

    Overrides: dotted strings (`["finetune.mode=lora"]`), or keywords (`finetune__mode="lora"`,
    `**{"training.num_train_epochs": 2}`, `task={"name": "sms-spam"}`).
    """
    return run(resolve(recipe, overrides, **kwargs))


def run(recipe: FinetuneRecipe) -> FinetuneResult:
    from accelerate.utils import set_seed

    from toolkit.engine.loop import Job, make_accelerator, train
    from toolkit.finetuning import modes
    from toolkit.finetuning.objective import FrozenHead, SequenceClassifier
    from toolkit.finetuning.tasks import load_task
    from toolkit.models import check_model_dir, load_config
    from toolkit.paths import resolve_path
    from toolkit.pretraining import publish

    started = time.perf_counter()
    t, f, out = recipe.training, recipe.finetune, Path(recipe.output_dir)
    # ---- every check that can fail on user input runs before any work or any file is written ---
    resume = outputs.prepare(out, t)  # writable, the checkpoint to resume from, no mixing of runs
    model_dir = resolve_path(recipe.model.model_name_or_path)
    check_model_dir(model_dir)
    tokenizer_dir = resolve_path(recipe.model.tokenizer_name_or_path) if recipe.model.tokenizer_name_or_path else None
    tokenizer = modes.load_tokenizer(model_dir, tokenizer_dir)
    modes.check_lengths(recipe, load_config(model_dir, {}))
    with _quiet_datasets():
        data = load_task(recipe.task, tokenizer)

    accelerator = make_accelerator(t, out)
    set_seed(t.seed)
    main = accelerator.is_main_process
    if main:
        rows = ", ".join(f"{k} {v}" for k, v in data.rows.items())
        kind = f"{len(data.labels)} classes ({', '.join(data.labels)})" if data.labels else "regression"
        print(f"task: {rows} rows; {kind}" + "".join(f"\n  note: {n}" for n in data.notes))

    # ---- the model in its mode ------------------------------------------------------------------
    built = modes.build(recipe, data, tokenizer, model_dir, accelerator.device)
    if main:
        share = 100 * built.trainable / max(built.total, 1)
        print(
            f"model: {type(built.base).__name__} from {recipe.model.model_name_or_path}, mode {f.mode}: "
            f"{built.trainable:,} of {built.total:,} parameters train ({share:.2f}%)"
            + (f"; new: {_summarise(built.new_weights)}" if built.new_weights else "")
        )
    objective_args = dataclasses.replace(f)
    train_data, eval_data, test_data = data.train, data.validation, data.test
    feature_seconds = 0.0
    if f.mode == "frozen":
        train_data, eval_data, test_data, feature_seconds = _frozen_features(
            recipe, data, built, model_dir, accelerator
        )
        objective = FrozenHead(built.model, objective_args, data.problem_type, tokenizer.pad_token_id)
    else:
        pad_to = modes.fixed_padding(recipe, built.base)
        objective = SequenceClassifier(
            built.model, objective_args, data.problem_type, tokenizer.pad_token_id, pad_to, recipe.task.max_seq_length
        )

    out.mkdir(parents=True, exist_ok=True)
    if resume is None and t.overwrite_output_dir and main:
        for p in ("checkpoints", "runs"):
            shutil.rmtree(out / p, ignore_errors=True)

    def write_extras(folder: Path) -> None:
        (folder / "recipe.yaml").write_text(to_yaml(recipe))
        tokenizer.save_pretrained(str(folder))

    job = Job(
        objective=objective,
        tokenizer=tokenizer,
        train_data=train_data,
        eval_data=eval_data,
        training=t,
        output_dir=out,
        write_extras=write_extras,
        tracker_config=_flat(to_dict(recipe)),
        name=f"finetune-{f.mode}",
    )
    from toolkit.engine.loop import eval_loader, evaluate

    with _one_thread(f.mode == "frozen" and accelerator.device.type == "cpu"):
        history, model = train(job, accelerator, resume)

        # ---- test split, with every prediction kept ---------------------------------------------
        test_metrics, test_examples = {}, {}
        if test_data is not None:
            loader = eval_loader(dataclasses.replace(job, eval_data=test_data), accelerator, t.seed)
            test_metrics = evaluate(model, objective, loader, accelerator, examples_out=test_examples)

    # ---- outputs: a model or adapter folder + recipe, metrics, predictions, model card ----------
    metrics = _final_metrics(history, test_metrics)
    epochs = history.get("train", {}).get("epoch") or 0.0
    metrics.update(
        mode=f.mode,
        trainable_params=built.trainable,
        total_params=built.total,
        trainable_share=built.trainable / max(built.total, 1),
        epochs=epochs,
        feature_seconds=feature_seconds,
        train_seconds_per_epoch=metrics["train_seconds"] / epochs if epochs else None,
    )
    from toolkit.engine.distributed import full_state_dict

    state_dict = full_state_dict(accelerator, model)  # gathers ZeRO-3 / FSDP shards; fp32 under DeepSpeed
    if main:
        from toolkit.finetuning.card import write_model_card

        trained = accelerator.unwrap_model(model).model

        def write_final(folder: Path) -> None:
            save_model(trained, folder, recipe, model_dir, state_dict)
            write_extras(folder)
            metrics["output_bytes"] = output_size(folder)
            metrics["total_seconds"] = time.perf_counter() - started
            (folder / RESULTS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
            if test_examples:
                write_predictions(folder / "test_predictions.csv", data, data.test, test_examples)
            write_model_card(folder, recipe, data, metrics, model_dir)

        publish(out, write_final)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    trained = accelerator.unwrap_model(model).model
    if f.mode == "frozen" and f.pooling == "mean":  # in memory as saved: the mean-pooling forward
        from toolkit.finetuning.heads import mean_pooled

        trained.__class__ = mean_pooled(type(trained).__name__)[1]
    return FinetuneResult(output_dir=out, metrics=metrics, model=trained, tokenizer=tokenizer)


def _frozen_features(recipe, data, built, model_dir, accelerator):
    """Encode every split once with the frozen encoder (main process first; the others read the cache)."""
    from toolkit.data.blocks import cache_root
    from toolkit.finetuning import features

    t, f = recipe.training, recipe.finetune
    cache = cache_root(None) / "features"
    built.model.to(accelerator.device)
    sets, seconds = [], 0.0
    with accelerator.main_process_first():
        for split, ds in (("train", data.train), ("validation", data.validation), ("test", data.test)):
            if ds is None:
                sets.append(None)
                continue
            key = features.cache_key(model_dir, recipe.model.config_overrides, f.pooling, ds, t.mixed_precision)
            fs, took, hit = features.features_for(
                built.model,
                ds,
                key,
                cache,
                f.pooling,
                t.per_device_eval_batch_size,
                accelerator.device,
                accelerator.autocast,
            )
            seconds += took
            if accelerator.is_main_process:
                print(
                    f"features ({f.pooling} pooling) of {split}: {len(fs)} x {fs.features.shape[1]}, "
                    + ("from the cache" if hit else f"encoded in {took:.1f} s")
                )
            sets.append(fs)
    return (*sets, seconds)


# ---- outputs --------------------------------------------------------------------------------------


def save_model(trained, folder: Path, recipe, model_dir: str, state_dict: dict | None) -> None:
    """full/frozen: the whole classifier; PEFT modes: the adapter (+ the classification config, so
    the base loads with the right labels). Mean pooling adds its model code (see heads.py)."""
    mode = recipe.finetune.mode
    if mode in PEFT_MODES:
        adapter_state = None
        if state_dict is not None:
            adapter_state = {k.removeprefix("model."): v for k, v in state_dict.items() if k.startswith("model.")}
        trained.save_pretrained(str(folder), state_dict=adapter_state)
        config = trained.get_base_model().config
        config = config.__class__.from_dict(config.to_dict())
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # the base is quantized at load time, never stored quantized
        config.save_pretrained(str(folder))
        _record_base(folder, recipe.model.model_name_or_path, model_dir)
        return
    weights = None if state_dict is None else {k.removeprefix("model."): v for k, v in state_dict.items()}
    trained.save_pretrained(str(folder), state_dict=weights)
    if mode in POOLING_MODES and recipe.finetune.pooling == "mean":
        from toolkit.finetuning import heads

        shutil.copyfile(heads.__file__, folder / POOLING_FILE)
        path = folder / "config.json"
        config = json.loads(path.read_text())
        config.update(heads.mean_pooled_config(config, type(trained).__name__.removeprefix("MeanPooled")))
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _record_base(folder: Path, spec: str, model_dir: str) -> None:
    """PEFT records the base as the folder it was loaded from; keep the recipe's name (pkg://...) too."""
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = str(Path(model_dir).resolve())
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def output_size(folder: Path) -> int:
    """Bytes of the artifact itself: weights/adapter, configs and tokenizer (not checkpoints or logs)."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def write_predictions(path: Path, data, test_ds, examples: dict) -> None:
    import torch

    logits, labels, idx = examples["logits"], examples["label"], examples["idx"].tolist()
    texts = {c: test_ds[c][:] for c in data.text_fields}
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        if data.problem_type == "regression":
            writer.writerow([*data.text_fields, "label", "prediction"])
            for r, i in enumerate(idx):
                writer.writerow([*(texts[c][i] for c in data.text_fields), float(labels[r]), float(logits[r, 0])])
            return
        probs = torch.softmax(logits.float(), -1)
        writer.writerow([*data.text_fields, "label", "prediction", *(f"p_{n}" for n in data.labels)])
        for r, i in enumerate(idx):
            writer.writerow(
                [
                    *(texts[c][i] for c in data.text_fields),
                    data.labels[int(labels[r])],
                    data.labels[int(probs[r].argmax())],
                    *(f"{p:.4f}" for p in probs[r].tolist()),
                ]
            )


def _final_metrics(history: dict, test: dict) -> dict:
    metrics = {k: history[k] for k in ("steps", "train_seconds", "world_size")}
    metrics.update({f"train_{k}": v for k, v in history.get("train", {}).items()})
    metrics.update({f"eval_{k}": v for k, v in history.get("eval", {}).items()})
    metrics.update({f"initial_eval_{k}": v for k, v in history.get("initial", {}).items()})
    metrics.update({f"test_{k}": v for k, v in test.items()})
    return metrics


def _summarise(names: list[str]) -> str:
    modules = sorted({n.rsplit(".", 1)[0] for n in names})
    return ", ".join(modules[:4]) + (f" (+{len(modules) - 4} more)" if len(modules) > 4 else "")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


@contextlib.contextmanager
def _one_thread(enabled: bool):
    """The frozen mode's head is tiny: on CPU its operations take microseconds, and waking a second
    thread for each of them costs more than the work (much more on a busy machine)."""
    import torch

    threads = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _quiet_datasets():
    import datasets

    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()
