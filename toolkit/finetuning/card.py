"""Model cards of fine-tuned models: base, mode, task, metrics, and the plain calls that load them."""

from __future__ import annotations

from pathlib import Path

from toolkit.config import to_yaml
from toolkit.finetuning.config import PEFT_MODES
from toolkit.finetuning.modes import QLORA_SKIP_MODULES

LOAD_FULL = """import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

path = "{path}"
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForSequenceClassification.from_pretrained(path{remote}).eval()
batch = tokenizer(["{example}"], return_tensors="pt")
with torch.no_grad():
    logits = model(**batch).logits
print(model.config.id2label[int(logits.argmax(-1))])"""

LOAD_ADAPTER = """import torch
from peft import PeftConfig, PeftModel
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer{extra_import}

path = "{path}"
tokenizer = AutoTokenizer.from_pretrained(path)
base = AutoModelForSequenceClassification.from_pretrained(
    PeftConfig.from_pretrained(path).base_model_name_or_path,  # the base checkpoint, unchanged
    config=AutoConfig.from_pretrained(path),  # the task's labels and padding token{quant}
)
model = PeftModel.from_pretrained(base, path).eval(){prefix}
batch = tokenizer(["{example}"], return_tensors="pt")
with torch.no_grad():
    logits = model(**batch).logits
print(model.config.id2label[int(logits.argmax(-1))])"""

QUANT = """
    quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="{qtype}", bnb_4bit_use_double_quant={double},
        bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules={skip},
    ),
    device_map="cpu","""

PREFIX = """
# transformers 5 renamed the cache argument that PEFT's prefix tuning passes: re-enable it
from toolkit.finetuning.prefix import support_prefix_tuning
support_prefix_tuning(model)"""


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def usage(recipe, path: str, example: str = "a wonderful, moving film") -> str:
    f = recipe.finetune
    if f.mode == "cloze":
        from toolkit.finetuning.cloze import usage as cloze_usage

        return cloze_usage(recipe, path, example)
    if f.mode not in PEFT_MODES:
        remote = ", trust_remote_code=True" if f.pooling == "mean" else ""
        return LOAD_FULL.format(path=path, remote=remote, example=example)
    quant = (
        QUANT.format(qtype=f.qlora_quant_type, double=f.qlora_double_quant, skip=QLORA_SKIP_MODULES)
        if f.mode == "qlora"
        else ""
    )
    return LOAD_ADAPTER.format(
        path=path,
        example=example,
        extra_import=", BitsAndBytesConfig" if f.mode == "qlora" else "",
        quant=quant,
        prefix=PREFIX if f.mode == "prefix" else "",
    )


def _cloze_kind(recipe) -> str:
    from toolkit.finetuning.cloze import describe

    return describe(recipe)


def write_model_card(folder: Path, recipe, data, metrics: dict, model_dir: str) -> None:
    f, t, task = recipe.finetune, recipe.training, recipe.task
    rows = []
    for key in sorted(k[len("eval_") :] for k in metrics if k.startswith("eval_")):
        before = metrics.get(f"initial_eval_{key}")
        test = metrics.get(f"test_{key}")
        rows.append(
            f"| {key} | {_fmt(before) if before is not None else '-'} | {_fmt(metrics['eval_' + key])} | "
            f"{_fmt(test) if test is not None else '-'} |"
        )
    labels = f"{len(data.labels)} classes: {', '.join(data.labels)}" if data.labels else "regression (one score)"
    kind = {
        "frozen": f"frozen encoder, head trained on cached {f.pooling}-pooled features",
        "full": f"full fine-tuning ({f.pooling} pooling"
        + (f", layer-wise learning-rate decay {f.layerwise_lr_decay})" if f.layerwise_lr_decay < 1 else ")"),
        "prompt": f"PEFT prompt tuning ({f.num_virtual_tokens} virtual tokens, {f.prompt_init} initialisation)",
        "prefix": f"PEFT prefix tuning ({f.num_virtual_tokens} virtual tokens)",
        "ptuning": f"PEFT P-tuning ({f.num_virtual_tokens} virtual tokens, {f.ptuning_encoder} prompt encoder)",
        "lora": f"PEFT LoRA (r={f.lora_r}, alpha={f.lora_alpha})",
        "qlora": f"PEFT QLoRA (r={f.lora_r}, alpha={f.lora_alpha}, 4-bit {f.qlora_quant_type} base)",
    }.get(f.mode) or _cloze_kind(recipe)
    artifact = (
        "a masked LM (`AutoModelForMaskedLM`, or a LoRA adapter on its base) and prompt.json (templates, verbalizer)"
        if f.mode == "cloze"
        else "a PEFT adapter (plus the classification config); the base checkpoint is recorded in adapter_config.json"
        if f.mode in PEFT_MODES
        else "a complete `AutoModelForSequenceClassification` model"
        + (
            " with its mean-pooling code (`toolkit_pooling.py`, load with `trust_remote_code=True`)"
            if f.pooling == "mean"
            else ""
        )
    )
    lines = [
        f"# {Path(recipe.output_dir).name}",
        "",
        f"Fine-tuned with the `toolkit`: {kind}, from `{recipe.model.model_name_or_path}` (`{model_dir}`).",
        f"This folder holds {artifact}.",
        "",
        "## Task",
        f"- {data.source}",
        f"- {labels}; texts: {', '.join(data.text_fields)}; up to {task.max_seq_length} tokens",
        f"- rows: {', '.join(f'{k} {v}' for k, v in data.rows.items())}",
        "",
        "## Training",
        f"- {metrics.get('trainable_params', 0):,} of {metrics.get('total_params', 0):,} parameters trained "
        f"({100 * metrics.get('trainable_share', 0):.2f}%)",
        f"- {metrics.get('steps')} optimizer steps ({metrics.get('epochs') or 0:.3g} epochs), "
        f"{metrics.get('train_seconds', 0):.0f} s of training on {metrics.get('world_size')} process(es)"
        + (f", {metrics['train_flops']:.3g} training FLOPs" if metrics.get("train_flops") else "")
        + (f" after {metrics['feature_seconds']:.0f} s of feature encoding" if metrics.get("feature_seconds") else ""),
        f"- learning rate {t.learning_rate} ({t.lr_scheduler_type}, warmup {t.warmup_ratio if not t.warmup_steps else t.warmup_steps}), "
        f"batch {t.per_device_train_batch_size} per process x {t.gradient_accumulation_steps} accumulation, seed {t.seed}",
        "",
        "## Metrics",
        "| metric | validation before | validation after | test |",
        "| --- | --- | --- | --- |",
        *rows,
        "",
        "## Use",
        "```python",
        usage(recipe, recipe.output_dir),
        "```",
        "",
        f"Or: `toolkit predict {recipe.output_dir} FILE.csv` writes a prediction for every row.",
        "",
        "## Recipe",
        "```yaml",
        to_yaml(recipe).rstrip(),
        "```",
        "",
    ]
    (folder / "README.md").write_text("\n".join(lines))
