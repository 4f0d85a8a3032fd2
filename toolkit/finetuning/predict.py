"""`toolkit predict`: load a fine-tuned folder (model or adapter) and label every row of a file.

Loading uses the plain calls a model card shows: `AutoModelForSequenceClassification` for full and
frozen outputs (with `trust_remote_code` for mean pooling), the recorded base plus
`PeftModel.from_pretrained` for adapters (4-bit for QLoRA, the prefix fix for prefix tuning).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from toolkit.errors import ToolkitError


def load_finetuned(path: str | Path):
    """(model in eval mode, tokenizer, recipe dict or {}) of a folder written by `toolkit finetune`."""
    import transformers
    import yaml
    from transformers import AutoConfig

    from toolkit.paths import resolve_path
    from toolkit.tokenizer import load_model_tokenizer

    path = Path(resolve_path(path))
    if not (path / "config.json").is_file():
        raise ToolkitError(f"'{path}' is not a fine-tuned model folder (it has no config.json)")
    recipe = yaml.safe_load((path / "recipe.yaml").read_text()) if (path / "recipe.yaml").is_file() else {}
    if (path / "prompt.json").is_file():  # cloze: a masked LM and its prompt
        return _load_masked_lm(path), load_model_tokenizer(str(path)), recipe
    remote = "auto_map" in json.loads((path / "config.json").read_text())  # mean pooling (heads.py)
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=remote)
    auto = getattr(transformers, _auto_class(path))
    if (path / "adapter_config.json").is_file():
        from peft import PeftConfig, PeftModel, PeftType

        from toolkit.finetuning.prefix import support_prefix_tuning

        peft_config = PeftConfig.from_pretrained(str(path))
        base = peft_config.base_model_name_or_path
        if not Path(base).is_dir():
            raise ToolkitError(f"the base model of '{path}' is not on this machine: '{base}' (see adapter_config.json)")
        kwargs = {}
        if recipe.get("finetune", {}).get("mode") == "qlora":
            from toolkit.finetuning.config import FinetuneArgs
            from toolkit.finetuning.modes import bnb_config

            known = {k: v for k, v in recipe["finetune"].items() if k in FinetuneArgs.__dataclass_fields__}
            kwargs.update(quantization_config=bnb_config(FinetuneArgs(**known), config), device_map={"": "cpu"})
        model = auto.from_pretrained(base, config=config, **kwargs)
        model = PeftModel.from_pretrained(model, str(path))
        if peft_config.peft_type == PeftType.PREFIX_TUNING:
            support_prefix_tuning(model)
    else:
        model, report = auto.from_pretrained(str(path), trust_remote_code=remote, output_loading_info=True)
        if report["missing_keys"]:  # a new, random head: its labels would mean nothing
            from toolkit.evaluation import weight_names

            what = "classifier" if auto.__name__ == "AutoModelForSequenceClassification" else "model"
            raise ToolkitError(
                f"'{path}' is a {', '.join(config.architectures or ['model'])}, not a fine-tuned {what}: its task "
                f"head's weights ({weight_names(report['missing_keys'])}) are missing, so predictions would come "
                "from a random head; fine-tune it first (`toolkit finetune`) and predict with that output_dir"
            )
    return model.eval(), load_model_tokenizer(str(path)), recipe


def _load_masked_lm(path: Path):
    """The masked LM (or, for a causal LM's prompt, the causal LM) of a cloze folder."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    causal = json.loads((path / "prompt.json").read_text()).get("model") == "causal"
    auto = AutoModelForCausalLM if causal else AutoModelForMaskedLM
    if not (path / "adapter_config.json").is_file():
        return auto.from_pretrained(str(path)).eval()
    from peft import PeftConfig, PeftModel

    base = PeftConfig.from_pretrained(str(path)).base_model_name_or_path
    if not Path(base).is_dir():
        raise ToolkitError(f"the base model of '{path}' is not on this machine: '{base}' (see adapter_config.json)")
    return PeftModel.from_pretrained(auto.from_pretrained(base), str(path)).eval()


def prompt_model(model_dir: str | Path, templates: list[str], verbalizer, text_fields: list[str], max_len=None):
    """(model, tokenizer, prompt.json content) for a prompt given on the command line: any masked LM
    (scored at the mask) or causal LM (label words scored after the prompt) folder, nothing trained."""
    from types import SimpleNamespace

    from toolkit.finetuning import causal as causal_lm
    from toolkit.finetuning import cloze
    from toolkit.models import is_causal_lm, load_config, max_positions
    from toolkit.paths import resolve_path
    from toolkit.tokenizer import load_model_tokenizer

    if not isinstance(verbalizer, dict) or not verbalizer:
        raise ToolkitError(
            f"--verbalizer must map each label to its word(s), e.g. '{{negative: terrible, positive: great}}'; "
            f"got {verbalizer!r}"
        )
    if len(text_fields) not in (1, 2):
        raise ToolkitError(
            f"--text-fields takes one or two columns for a prompt ({{text}}, {{text_b}}), got {text_fields}"
        )
    prompt = SimpleNamespace(template=list(templates), verbalizer=verbalizer, length_normalize=False)
    cloze.check_prompt(prompt, pair=len(text_fields) == 2)
    path = resolve_path(model_dir)
    if not (Path(path) / "config.json").is_file():
        raise ToolkitError(f"'{path}' is not a model folder (it has no config.json)")
    config = load_config(path, {})
    causal = is_causal_lm(config)
    model = cloze.load_lm(path, config, causal).eval()
    tokenizer = load_model_tokenizer(path)
    max_len = int(max_len or min(max_positions(config), 512))
    labels = [str(k) for k in verbalizer]
    verbalizer = {str(k): v for k, v in verbalizer.items()}
    if causal:
        words = causal_lm.label_words(tokenizer, labels, verbalizer)
        content = cloze.prompt_content(
            prompt, labels, None, text_fields, max_len, {"words": words, "demonstrations": []}
        )
    else:
        cloze.check_tokenizer(tokenizer)
        ids = cloze.verbalizer_ids(tokenizer, labels, verbalizer, single_token=False)
        content = cloze.prompt_content(prompt, labels, ids, text_fields, max_len)
    return model, tokenizer, content


def _causal_logits(model, tokenizer, prompt: dict, table, fields: list[str], batch_size: int) -> torch.Tensor:
    """Label scores of every row: the saved templates and demonstrations rendered, each label's words
    scored by their likelihood after the prompt."""
    from toolkit.finetuning import causal

    demos = [(d["texts"], d["label"]) for d in prompt["demonstrations"]]
    encoded = causal.encode(
        table.select_columns(fields),
        tokenizer,
        prompt["templates"],
        fields,
        prompt["max_seq_length"],
        prompt["label_word_ids"],
        demos,
    )
    encoded = encoded.add_column("labels", [0] * len(encoded))
    examples = causal.CausalExamples(encoded)
    out = []
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            b = examples.__getitems__(list(range(start, min(start + batch_size, len(examples)))))
            out.append(
                causal.label_scores(
                    model,
                    prompt["label_word_ids"],
                    b["prompt_ids"],
                    b["prompt_lengths"],
                    tokenizer.pad_token_id,
                    prompt["length_normalize"],
                )
            )
    return torch.cat(out)


def _cloze_logits(model, tokenizer, prompt: dict, table, fields: list[str], batch_size: int) -> torch.Tensor:
    """Label scores of every row: the saved templates rendered, the verbalizer read at the mask."""
    from toolkit.finetuning import cloze

    encoded = cloze.encode(
        table.select_columns(fields), tokenizer, prompt["templates"], fields, prompt["max_seq_length"]
    )
    encoded = encoded.add_column("labels", [0] * len(encoded))
    examples = cloze.ClozeExamples(encoded, tokenizer.pad_token_id)
    matrix = cloze.label_matrix(prompt["verbalizer_ids"], model.get_output_embeddings().weight.shape[0])
    out = []
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            b = examples.__getitems__(list(range(start, min(start + batch_size, len(examples)))))
            out.append(cloze.label_scores(model, matrix, b["input_ids"], b["attention_mask"], b["mask_positions"]))
    return torch.cat(out)


def _task_facts(path: Path) -> dict:
    from toolkit.finetuning.pipeline import TASK_FILE

    file = path / TASK_FILE
    return json.loads(file.read_text()) if file.is_file() else {"task_type": "sequence_classification"}


def _auto_class(path: Path) -> str:
    kind = _task_facts(path)["task_type"]
    if kind in ("sequence_classification", "regression"):
        return "AutoModelForSequenceClassification"
    from toolkit.finetuning.types import plugin

    return plugin(kind).auto_class


def predict(
    model_dir: str | Path,
    file: str,
    output: str | Path | None = None,
    batch_size: int = 32,
    text_fields: list[str] | None = None,
    file_format: str | None = None,
    template: str | list[str] | None = None,
    verbalizer: dict | None = None,
    max_seq_length: int | None = None,
    label_field: str | None = None,
) -> tuple[Path, dict]:
    """Write a prediction for every row of `file` (CSV/TSV/JSON/JSONL/Parquet) to `output` (.csv or
    .jsonl); returns (output path, metrics when the file has the label column, else {}).

    With `template` and `verbalizer`, `model_dir` may be any masked or causal LM folder (a pretraining
    output, a Hugging Face checkpoint): the prompt is asked zero-shot, as a `cloze` run with
    `num_train_epochs: 0` would, and nothing is saved but the predictions."""
    from types import SimpleNamespace

    from toolkit.finetuning import metrics as task_metrics
    from toolkit.finetuning.cloze import read_prompt
    from toolkit.finetuning.heads import is_decoder
    from toolkit.finetuning.tasks import label_strings, read_table, tokenize
    from toolkit.hf import quiet_datasets
    from toolkit.paths import resolve_path

    if (template is None) != (verbalizer is None):
        raise ToolkitError("a zero-shot prompt needs both --template and --verbalizer (or neither)")
    if template is not None:
        templates = [template] if isinstance(template, str) else list(template)
        fields = list(text_fields or ["text"])
        model, tokenizer, given = prompt_model(model_dir, templates, verbalizer, fields, max_seq_length)
        recipe = {}
    else:
        model, tokenizer, recipe = load_finetuned(model_dir)
        given = None
        facts = _task_facts(Path(resolve_path(model_dir)))
        if facts["task_type"] not in ("sequence_classification", "regression"):
            return _predict_type(model, tokenizer, {**recipe, "_facts": facts}, file, output, batch_size, file_format)
    task = recipe.get("task", {})
    fields = list(text_fields or task.get("text_fields") or ["text"])
    label_field = label_field or task.get("label_field", "label")
    max_len = task.get("max_seq_length") or 128
    with quiet_datasets():
        table = read_table(file, file_format or task.get("file_format"), "predict")
        if hasattr(table, "keys"):
            if "test" not in table:
                raise ToolkitError(
                    f"'{file}' holds splits {', '.join(table.keys())}: name a file or a folder with a 'test' split"
                )
            table = table["test"]
        missing = [c for c in fields if c not in table.column_names]
        if missing:
            raise ToolkitError(
                f"no column {', '.join(map(repr, missing))} in '{file}': its columns are {', '.join(table.column_names)}; "
                "pass --text-fields"
            )
        prompt = given or read_prompt(resolve_path(model_dir))
        if prompt is None:
            encoded = tokenize(table, tokenizer, fields, max_len)
        else:
            scorer = _causal_logits if prompt.get("model") == "causal" else _cloze_logits
            cloze_logits = scorer(model, tokenizer, prompt, table, fields, batch_size)
    config = model.config
    if prompt is not None:  # the labels live in prompt.json; a masked LM's config has none
        config = SimpleNamespace(
            problem_type="classification",
            num_labels=len(prompt["labels"]),
            id2label=dict(enumerate(prompt["labels"])),
            label2id={n: i for i, n in enumerate(prompt["labels"])},
        )
    regression = config.problem_type == "regression"
    mode = recipe.get("finetune", {}).get("mode")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    pad_to = max_len if mode in ("prompt", "ptuning") and is_decoder(base) else None

    logits = [cloze_logits] if prompt is not None else []
    columns = [
        c for c in ("input_ids", "attention_mask", "token_type_ids") if prompt is None and c in encoded.column_names
    ]
    with torch.no_grad():
        for start in range(0, len(encoded) if prompt is None else 0, batch_size):
            rows = encoded.select_columns(columns)[start : start + batch_size]
            width = pad_to or max(len(x) for x in rows["input_ids"])
            batch = {}
            for c in columns:
                fill = tokenizer.pad_token_id if c == "input_ids" else 0
                t = torch.full((len(rows["input_ids"]), width), fill, dtype=torch.long)
                for r, seq in enumerate(rows[c]):
                    t[r, : len(seq)] = torch.tensor(seq)
                batch[c] = t
            logits.append(model(**batch).logits.float())
    logits = torch.cat(logits)

    out = Path(output) if output else Path(f"{Path(str(file).rstrip('/')).stem}.predictions.csv")
    names = [config.id2label[i] for i in range(config.num_labels)]
    records = table.to_list()
    if regression:
        for rec, value in zip(records, logits[:, 0].tolist()):
            rec["prediction"] = value
    else:
        probs = torch.softmax(logits, -1)
        for rec, p in zip(records, probs.tolist()):
            rec["prediction"] = names[max(range(len(p)), key=p.__getitem__)]
            rec.update({f"p_{n}": round(v, 6) for n, v in zip(names, p)})
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".jsonl":
        out.write_text("".join(json.dumps(r, default=str) + "\n" for r in records))
    else:
        with out.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(records[0]) if records else ["prediction"])
            writer.writeheader()
            writer.writerows(records)

    scores: dict = {}
    if label_field in table.column_names:
        values = table[label_field][:]
        if regression:
            labels = torch.tensor([float(v) for v in values])
        else:
            strings = label_strings(table.features[label_field], values)
            unseen = sorted({s for s in strings if s not in config.label2id})
            if unseen:
                raise ToolkitError(
                    f"column '{label_field}' of '{file}' holds labels the model does not know "
                    f"({', '.join(map(repr, unseen[:5]))}{' ...' if len(unseen) > 5 else ''}; it knows "
                    f"{', '.join(map(repr, config.label2id))}), so no metrics can be computed; the predictions "
                    f"are in {out}: rename or drop that column to predict without metrics"
                )
            labels = torch.tensor([config.label2id[s] for s in strings])
        scores = task_metrics.compute("regression" if regression else "classification", logits, labels)
    return out, scores


def _predict_type(model, tokenizer, recipe: dict, file, output, batch_size: int, file_format) -> tuple[Path, dict]:
    """predict for a task type plug-in: its own reading, decoding and metrics; one output row per input row."""
    import datasets

    from toolkit.finetuning.tasks import read_table
    from toolkit.finetuning.types import plugin
    from toolkit.finetuning.types.question_answering import is_squad_json, read_squad
    from toolkit.finetuning.types.token_classification import is_conll, read_conll
    from toolkit.hf import quiet_datasets
    from toolkit.paths import resolve_path

    kind = plugin(recipe["_facts"]["task_type"])
    path = Path(resolve_path(file))
    fmt = file_format or recipe.get("task", {}).get("file_format")
    with quiet_datasets():
        if kind.name == "token_classification" and path.is_file() and is_conll(path, fmt):
            table = datasets.Dataset.from_dict(read_conll(path, recipe.get("task", {}).get("conll_tag_column", -1)))
        elif kind.name == "question_answering" and is_squad_json(path):
            table = datasets.Dataset.from_dict(read_squad(path))
        else:
            table = read_table(file, fmt, "predict")
            if hasattr(table, "keys"):
                if "test" not in table:
                    raise ToolkitError(f"'{file}' holds splits {', '.join(table.keys())}: name one with a 'test' split")
                table = table["test"]
        records, scores = kind.predict(model, tokenizer, recipe, table, batch_size)
    out = Path(output) if output else Path(f"{Path(str(file).rstrip('/')).stem}.predictions.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".jsonl":
        out.write_text("".join(json.dumps(r, default=str) + "\n" for r in records))
    else:  # lists (words, tags) as JSON inside the CSV cells
        with out.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(records[0]) if records else ["prediction"])
            writer.writeheader()
            writer.writerows(
                [{k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()} for r in records]
            )
    return out, scores
