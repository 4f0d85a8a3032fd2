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

from toolkit.config import resolve
from toolkit.engine import run as harness
from toolkit.engine.run import Setup, metrics_summary
from toolkit.finetuning.config import PEFT_MODES, POOLING_MODES, FinetuneRecipe

POOLING_FILE = "toolkit_pooling.py"
TASK_FILE = "toolkit_task.json"  # the task type and facts predict needs (e.g. unanswerable questions)


@dataclass
class FinetuneResult:
    output_dir: Path
    metrics: dict  # eval_* (validation, end), initial_eval_*, test_*, train stats, parameter counts
    model: object = None  # the trained transformers (or PEFT) model, in memory
    tokenizer: object = None

    def summary(self) -> str:
        return metrics_summary(self.output_dir, self.metrics, f"mode {self.metrics.get('mode')}")


def finetune(recipe=None, overrides: list[str] | dict | None = None, **kwargs) -> FinetuneResult:
    """Fine-tune from a recipe (YAML path, dict or FinetuneRecipe) with optional overrides.

    Overrides: dotted strings (`["finetune.mode=lora"]`), or keywords (`finetune__mode="lora"`,
    `**{"training.num_train_epochs": 2}`, `task={"name": "sms-spam"}`).
    """
    return run(resolve(FinetuneRecipe, recipe, overrides, **kwargs))


def run(recipe: FinetuneRecipe) -> FinetuneResult:
    from toolkit.finetuning import modes
    from toolkit.hf import quiet_datasets
    from toolkit.models import check_model_dir, is_causal_lm, load_config
    from toolkit.paths import resolve_path
    from toolkit.tokenizer import load_model_tokenizer

    started = time.perf_counter()
    f = recipe.finetune
    model_dir = resolve_path(recipe.model.model_name_or_path)
    tokenizer_dir = resolve_path(recipe.model.tokenizer_name_or_path) if recipe.model.tokenizer_name_or_path else None
    loaded: dict = {}

    def checks() -> None:  # the checkpoint, its tokenizer and the task's data, before any training
        from toolkit.finetuning import types

        check_model_dir(model_dir)
        loaded["tokenizer"] = tokenizer = load_model_tokenizer(model_dir, tokenizer_dir)
        modes.check_lengths(recipe, load_config(model_dir, {}))
        with quiet_datasets():
            kind = types.resolve_type(recipe.task)
            types.check_mode(kind, f.mode)  # before the data is tokenized
            kind, found, loaded["data"] = types.load_any(recipe.task, tokenizer, kind)
            if found is not None:  # token classification, question answering, generation
                loaded["plugin"] = found
                if recipe.task.shots:
                    from toolkit.errors import ToolkitError

                    raise ToolkitError(
                        f"task.shots samples examples per class, which task.type={kind} does not have: unset it "
                        "(task.max_train_samples takes a subset of any task)"
                    )
            else:
                data = loaded["data"]
                if recipe.task.shots:
                    from toolkit.finetuning.fewshot import sample_shots

                    sample_shots(data, recipe.task.shots, recipe.training.seed)
                if f.mode == "cloze":  # templates rendered, verbalizer checked against the vocabulary
                    from toolkit.finetuning import causal, cloze

                    loaded["causal"] = is_causal_lm(load_config(model_dir, {}))
                    if loaded["causal"]:  # a GPT-style model: label words scored by their likelihood
                        loaded["verbalizer"] = causal.encode_task(
                            data, tokenizer, recipe.prompt, recipe.task.max_seq_length, recipe.training.seed
                        )
                    elif recipe.prompt.demonstrations:
                        from toolkit.errors import ToolkitError

                        raise ToolkitError(
                            f"prompt.demonstrations={recipe.prompt.demonstrations} is for causal LMs (in-context "
                            f"examples before the prompt), and '{recipe.model.model_name_or_path}' is a masked LM: "
                            "set prompt.demonstrations=0"
                        )
                    else:
                        loaded["verbalizer"] = cloze.encode_task(
                            data, tokenizer, recipe.prompt, recipe.task.max_seq_length
                        )

    def setup(accelerator, resume) -> Setup:
        tokenizer, data = loaded["tokenizer"], loaded["data"]
        if "plugin" in loaded:  # token classification, question answering, generation
            return _type_setup(recipe, loaded["plugin"], data, tokenizer, model_dir, accelerator, started)
        main = accelerator.is_main_process
        if main:
            rows = ", ".join(f"{k} {v}" for k, v in data.rows.items())
            kind = f"{len(data.labels)} classes ({', '.join(data.labels)})" if data.labels else "regression"
            print(f"task: {rows} rows; {kind}" + "".join(f"\n  note: {n}" for n in data.notes))
        if f.mode == "cloze":
            from toolkit.finetuning import cloze

            built = cloze.build(recipe, model_dir, tokenizer, causal=loaded["causal"])
        else:
            built = modes.build(recipe, data, tokenizer, model_dir, accelerator.device)
        if main:
            share = 100 * built.trainable / max(built.total, 1)
            print(
                f"model: {type(built.base).__name__} from {recipe.model.model_name_or_path}, mode {f.mode}: "
                f"{built.trainable:,} of {built.total:,} parameters train ({share:.2f}%)"
                + (f"; new: {_summarise(built.new_weights)}" if built.new_weights else "")
            )
        objective, train_data, eval_data, test_data, feature_seconds = _objective_and_data(
            recipe, data, built, tokenizer, model_dir, accelerator, loaded.get("verbalizer"), loaded.get("causal")
        )
        test_examples: dict = {}

        def after_train(model, accelerator, job) -> dict:  # the test split, every prediction kept

            if test_data is None:
                return {}
            return {
                f"test_{k}": v
                for k, v in evaluate_split(model, objective, job, accelerator, test_data, test_examples).items()
            }

        def write_outputs(folder: Path, metrics: dict) -> None:
            add_run_facts(metrics, folder, started)
            if test_examples:
                write_predictions(folder / "test_predictions.csv", data, data.test, test_examples)
            if f.mode == "cloze":  # what `toolkit predict` needs to ask the masked LM
                from toolkit.finetuning.cloze import write_prompt

                write_prompt(
                    folder,
                    recipe.prompt,
                    data.labels,
                    loaded["verbalizer"],
                    data.text_fields,
                    recipe.task.max_seq_length,
                    causal=loaded["verbalizer"] if loaded["causal"] else None,
                )

        from toolkit.finetuning.card import write_model_card

        return Setup(
            objective=objective,
            tokenizer=tokenizer,
            train_data=train_data,
            eval_data=eval_data,
            after_train=after_train,
            save_model=lambda folder, objective, state: save_model(objective.model, folder, recipe, model_dir, state),
            write_outputs=write_outputs,
            write_card=lambda folder, metrics: write_model_card(folder, recipe, data, metrics, model_dir),
            # the frozen mode's head is tiny: on CPU a second thread costs more than it saves
            train_context=_one_thread(f.mode == "frozen" and accelerator.device.type == "cpu"),
            metrics={
                "mode": f.mode,
                "trainable_params": built.trainable,
                "total_params": built.total,
                "trainable_share": built.trainable / max(built.total, 1),
                "feature_seconds": feature_seconds,
            },
        )

    outcome = harness.run(recipe, setup, name=f"finetune-{f.mode}", checks=checks)
    trained = outcome.model
    if (
        f.mode == "frozen" and f.pooling == "mean" and "plugin" not in loaded
    ):  # in memory as saved: the mean-pooling forward
        from toolkit.finetuning.heads import mean_pooled

        trained.__class__ = mean_pooled(type(trained).__name__)[1]
    return FinetuneResult(
        output_dir=outcome.output_dir, metrics=outcome.metrics, model=trained, tokenizer=loaded["tokenizer"]
    )


def _type_setup(recipe, kind, data, tokenizer, model_dir: str, accelerator, started: float) -> Setup:
    """The run of a task type plug-in (types/): the same engine, modes and outputs, the plug-in's
    model class, objective, metrics and predictions."""
    from toolkit.finetuning import modes
    from toolkit.finetuning.types.base import write_type_card

    f = recipe.finetune
    main = accelerator.is_main_process
    if main:
        rows = ", ".join(f"{k} {v}" for k, v in data.rows.items())
        tags = f"; {len(data.labels)} tags" if data.labels else ""
        windows = ", ".join(f"{k} {len(v)}" for k, v in data.splits().items())
        print(
            f"task ({kind.name}): {rows} examples{tags}; features {windows}"
            + "".join(f"\n  note: {n}" for n in data.notes)
        )
    config = kind.model_config(model_dir, data, tokenizer, recipe.model.config_overrides)
    built = modes.build(
        recipe, data, tokenizer, model_dir, accelerator.device, auto_class=kind.auto_class, config=config
    )
    if main:
        share = 100 * built.trainable / max(built.total, 1)
        print(
            f"model: {type(built.base).__name__} from {recipe.model.model_name_or_path}, mode {f.mode}: "
            f"{built.trainable:,} of {built.total:,} parameters train ({share:.2f}%)"
            + (f"; new: {_summarise(built.new_weights)}" if built.new_weights else "")
        )
    objective = kind.objective(built.model, recipe, data, tokenizer)
    train_data, eval_data, test_data, feature_seconds = data.train, data.validation, data.test, 0.0
    if f.mode == "frozen":  # the encoder runs once per window; the head trains on its cached token vectors
        from toolkit.finetuning.features import TOKENS

        train_data, eval_data, test_data, feature_seconds = _frozen_features(
            recipe, data, built, model_dir, accelerator, TOKENS
        )
    test_examples: dict = {}

    def after_train(model, accelerator, job) -> dict:  # the test split, every prediction kept

        if data.test is None:
            return {}
        if hasattr(objective, "reference"):  # what the test split's metrics score against
            objective.reference = (data.test, data.raw["test"])
        scores = evaluate_split(model, objective, job, accelerator, test_data, test_examples)
        if accelerator.is_main_process:
            scores.update(kind.test_metrics(objective.model, objective, data, recipe, tokenizer, test_examples))
        return {f"test_{k}": v for k, v in scores.items()}

    def write_outputs(folder: Path, metrics: dict) -> None:
        add_run_facts(metrics, folder, started)
        facts = {k: v for k, v in data.extra.items() if isinstance(v, (bool, int, float, str))}
        (folder / TASK_FILE).write_text(json.dumps({"task_type": kind.name, **facts}, indent=2) + "\n")
        kind.write_files(folder, recipe, data)
        if data.test is not None and (test_examples or kind.name == "generation"):
            kind.write_predictions(folder, data, test_examples, objective)

    return Setup(
        objective=objective,
        tokenizer=tokenizer,
        train_data=train_data,
        eval_data=eval_data,
        after_train=after_train,
        save_model=lambda folder, objective, state: save_model(objective.model, folder, recipe, model_dir, state),
        write_outputs=write_outputs,
        write_card=lambda folder, metrics: write_type_card(folder, recipe, kind, data, metrics, model_dir),
        metrics={
            "mode": f.mode,
            "task_type": kind.name,
            "trainable_params": built.trainable,
            "total_params": built.total,
            "trainable_share": built.trainable / max(built.total, 1),
            "feature_seconds": feature_seconds,
        },
    )


def evaluate_split(model, objective, job, accelerator, split, examples_out: dict) -> dict:
    """Metrics of a whole split (the test split after training), every prediction kept in `examples_out`."""
    from toolkit.engine.loop import eval_loader, evaluate

    loader = eval_loader(dataclasses.replace(job, eval_data=split), accelerator, job.training.seed)
    return evaluate(model, objective, loader, accelerator, examples_out=examples_out)


def add_run_facts(metrics: dict, folder: Path, started: float) -> None:
    """Epochs, seconds per epoch, size of the saved artifact and the run's total time, for results.json."""
    epochs = metrics.get("train_epoch") or 0.0
    metrics.update(
        epochs=epochs,
        train_seconds_per_epoch=metrics["train_seconds"] / epochs if epochs else None,
        output_bytes=output_size(folder),
        total_seconds=time.perf_counter() - started,
    )


def _objective_and_data(recipe, data, built, tokenizer, model_dir, accelerator, verbalizer=None, causal=False):
    """The training objective of the mode and the splits it reads (the frozen mode: cached features)."""
    from toolkit.finetuning import modes
    from toolkit.finetuning.objective import FrozenHead, SequenceClassifier

    f = recipe.finetune
    args = dataclasses.replace(f)
    if f.mode == "cloze" and causal:
        from toolkit.finetuning.causal import CausalClozeClassifier

        objective = CausalClozeClassifier(
            built.model,
            args,
            tokenizer.pad_token_id,
            verbalizer["words"],
            recipe.prompt.length_normalize,
            recipe.task.max_seq_length,
        )
        return objective, data.train, data.validation, data.test, 0.0
    if f.mode == "cloze":
        from toolkit.finetuning.cloze import ClozeClassifier

        vocab = built.base.get_output_embeddings().weight.shape[0]
        objective = ClozeClassifier(
            built.model, args, tokenizer.pad_token_id, verbalizer, vocab, recipe.task.max_seq_length
        )
        return objective, data.train, data.validation, data.test, 0.0
    if f.mode == "frozen":
        train_data, eval_data, test_data, seconds = _frozen_features(recipe, data, built, model_dir, accelerator)
        objective = FrozenHead(built.model, args, data.problem_type, tokenizer.pad_token_id)
        return objective, train_data, eval_data, test_data, seconds
    pad_to = modes.fixed_padding(recipe, built.base)
    objective = SequenceClassifier(
        built.model, args, data.problem_type, tokenizer.pad_token_id, pad_to, recipe.task.max_seq_length
    )
    return objective, data.train, data.validation, data.test, 0.0


def _frozen_features(recipe, data, built, model_dir, accelerator, pooling: str | None = None):
    """Encode every split once with the frozen encoder (main process first; the others read the cache):
    one vector per example by finetune.pooling, or every token's with pooling=features.TOKENS."""
    from toolkit.data.blocks import cache_root
    from toolkit.finetuning import features

    t, f = recipe.training, recipe.finetune
    pooling = pooling or f.pooling
    cache = cache_root(None) / "features"
    built.model.to(accelerator.device)
    sets, seconds = [], 0.0
    with accelerator.main_process_first():
        for split, ds in (("train", data.train), ("validation", data.validation), ("test", data.test)):
            if ds is None:
                sets.append(None)
                continue
            key = features.cache_key(model_dir, recipe.model.config_overrides, pooling, ds, t.mixed_precision)
            fs, took, hit = features.features_for(
                built.model,
                ds,
                key,
                cache,
                pooling,
                t.per_device_eval_batch_size,
                accelerator.device,
                accelerator.autocast,
            )
            seconds += took
            if accelerator.is_main_process:
                size = f"{len(fs)} x {fs.features.shape[1]}"
                if pooling == features.TOKENS:
                    size = f"{len(fs)} windows, {fs.features.shape[0]} tokens x {fs.features.shape[1]}"
                print(
                    f"features ({'per token' if pooling == features.TOKENS else f'{pooling} pooling'}) of {split}: "
                    f"{size}, " + ("from the cache" if hit else f"encoded in {took:.1f} s")
                )
            sets.append(fs)
    return (*sets, seconds)


# ---- outputs --------------------------------------------------------------------------------------


def save_model(trained, folder: Path, recipe, model_dir: str, state_dict: dict | None) -> None:
    """full/frozen: the whole classifier; PEFT modes: the adapter (+ the classification config, so
    the base loads with the right labels). Mean pooling adds its model code (see heads.py)."""
    mode = recipe.finetune.mode
    if mode in PEFT_MODES or hasattr(trained, "peft_config"):  # cloze with LoRA saves an adapter too
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


def _summarise(names: list[str]) -> str:
    modules = sorted({n.rsplit(".", 1)[0] for n in names})
    return ", ".join(modules[:4]) + (f" (+{len(modules) - 4} more)" if len(modules) > 4 else "")


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
