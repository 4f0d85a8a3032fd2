"""The fine-tuning modes: which parameters of `AutoModelForSequenceClassification` train, and how.

    frozen   encoder fixed; the head (BERT's pooler + classifier, ELECTRA's classification head,
             GPT-2's score; the tagging or span head of the other types) trains on cached features
    full     every parameter
    prompt   PEFT prompt tuning: virtual token embeddings (random or text initialisation)
    prefix   PEFT prefix tuning: per-layer key/value prefixes (transformers 5 fix in prefix.py)
    ptuning  PEFT P-tuning: virtual tokens produced by a small prompt encoder
    lora     PEFT LoRA on the architecture's attention projections
    qlora    LoRA on a base quantized to 4 bits by bitsandbytes

In the PEFT modes the head is a PEFT `modules_to_save` module: it trains and is saved with the
adapter, while the base weights stay untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from toolkit.errors import ToolkitError
from toolkit.finetuning.heads import NATIVE_CLASSES, TOKEN_CLASSES, head_modules, is_decoder, mean_pooled
from toolkit.hf import quiet_transformers

# Modules the 4-bit base keeps in full precision: the head, which trains. transformers matches these
# from the start of a module's name or as a suffix, so BERT's pooler (`bert.pooler.dense`) needs `.*`.
QLORA_SKIP_MODULES = ["classifier", "pre_classifier", "score", "qa_outputs", ".*pooler"]


@dataclass
class Built:
    model: torch.nn.Module  # the transformers model, or the PeftModel around it
    base: torch.nn.Module  # the transformers model
    trainable: int
    total: int
    new_weights: list[str]  # parameters the checkpoint did not have (initialised fresh)


def classification_config(model_dir: str, data, tokenizer, overrides: dict):
    """The checkpoint's config with the task's labels, problem type and padding token."""
    from toolkit.models import apply_overrides, load_config

    config = load_config(model_dir, {})
    config.num_labels = data.num_labels
    if data.problem_type == "regression":
        config.problem_type = "regression"
        config.id2label, config.label2id = {0: "score"}, {"score": 0}
    else:
        config.problem_type = "single_label_classification"
        config.id2label = dict(enumerate(data.labels))
        config.label2id = {name: i for i, name in enumerate(data.labels)}
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id
    apply_overrides(config, overrides)
    return config


def build(
    recipe, data, tokenizer, model_dir: str, device, auto_class: str = "AutoModelForSequenceClassification", config=None
) -> Built:
    """Load the checkpoint as `auto_class` (a sequence classifier unless a task type says otherwise,
    with `config` carrying its labels) and make the mode's parameters trainable."""
    import transformers

    f = recipe.finetune
    classifier = auto_class == "AutoModelForSequenceClassification"
    if config is None:
        config = classification_config(model_dir, data, tokenizer, recipe.model.config_overrides)
    kwargs: dict = {"config": config}
    if f.mode == "qlora":
        kwargs.update(quantization_config=bnb_config(f, config), device_map={"": device})
    try:
        with quiet_transformers():
            model, info = getattr(transformers, auto_class).from_pretrained(
                model_dir, output_loading_info=True, **kwargs
            )
    except (ValueError, KeyError, OSError) as e:
        raise ToolkitError(f"cannot load '{model_dir}' as {auto_class}: {e}") from None
    new = sorted(info.get("missing_keys", []))
    if (
        classifier
        and (f.mode == "frozen" or f.pooling == "mean" and f.mode == "full")
        and type(model).__name__ not in NATIVE_CLASSES
    ):
        raise ToolkitError(
            f"the frozen mode and mean pooling know the heads of {', '.join(NATIVE_CLASSES)}, not "
            f"{type(model).__name__}: use finetune.mode=full with finetune.pooling=cls, or a PEFT mode"
        )
    if f.mode == "frozen" and not classifier and type(model).__name__ not in TOKEN_CLASSES:
        raise ToolkitError(
            f"the frozen mode trains a per-token head on cached features and knows the heads of "
            f"{', '.join(TOKEN_CLASSES)}, not {type(model).__name__}: use finetune.mode=full or a PEFT mode"
        )
    if f.mode == "frozen":  # only the head trains (on cached features: features.py)
        head = tuple(f"{name}." for name in head_modules(model))
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith(head)
        peft_model = model
    elif f.mode == "full":
        for p in model.parameters():
            p.requires_grad = True
        if f.pooling == "mean" and classifier:  # the same weights, a forward that mean-pools (heads.py)
            model.__class__ = mean_pooled(type(model).__name__)[1]
        peft_model = model
    else:
        peft_model = _peft_model(model, recipe, data, tokenizer, model_dir)
    trainable, total = count_parameters(peft_model)
    return Built(peft_model, model, trainable, total, new)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, all) parameters; 4-bit weights count as the values they hold, as PEFT counts them."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def bnb_config(f, config):
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ToolkitError("finetune.mode=qlora needs bitsandbytes: pip install bitsandbytes") from None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=f.qlora_quant_type,
        bnb_4bit_use_double_quant=f.qlora_double_quant,
        bnb_4bit_compute_dtype=torch.float32,
        llm_int8_skip_modules=QLORA_SKIP_MODULES,
    )


def _peft_model(model, recipe, data, tokenizer, model_dir: str):
    import peft

    from toolkit.finetuning.prefix import support_prefix_tuning

    f = recipe.finetune
    head = [name.rsplit(".", 1)[-1] for name in head_modules(model)]
    task_type = PEFT_TASK_TYPES.get(type(model).__name__.split("For")[-1], peft.TaskType.SEQ_CLS)
    common = {"task_type": task_type, "modules_to_save": head or None}
    if f.mode == "prompt":
        text = f.prompt_init_text or default_prompt_text(data)
        cfg = peft.PromptTuningConfig(
            num_virtual_tokens=f.num_virtual_tokens,
            prompt_tuning_init={
                "random": peft.PromptTuningInit.RANDOM,
                "vocab": peft.PromptTuningInit.SAMPLE_VOCAB,
                "text": peft.PromptTuningInit.TEXT,
            }[f.prompt_init],
            prompt_tuning_init_text=text if f.prompt_init == "text" else None,
            tokenizer_name_or_path=recipe.model.tokenizer_name_or_path or model_dir,
            **common,
        )
    elif f.mode == "prefix":
        model = support_prefix_tuning(model)
        cfg = peft.PrefixTuningConfig(
            num_virtual_tokens=f.num_virtual_tokens,
            prefix_projection=f.prefix_projection,
            encoder_hidden_size=f.encoder_hidden_size or model.config.hidden_size,
            **common,
        )
    elif f.mode == "ptuning":
        cfg = peft.PromptEncoderConfig(
            num_virtual_tokens=f.num_virtual_tokens,
            encoder_reparameterization_type=f.ptuning_encoder,
            encoder_hidden_size=f.encoder_hidden_size or model.config.hidden_size,
            **common,
        )
    else:  # lora, qlora
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as TARGETS

        targets = f.lora_target_modules
        if targets is None and model.config.model_type not in TARGETS:
            raise ToolkitError(
                f"PEFT has no default LoRA target modules for model type '{model.config.model_type}': set "
                "finetune.lora_target_modules, e.g. [query, value]"
            )
        if f.mode == "qlora":
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        cfg = peft.LoraConfig(
            r=f.lora_r, lora_alpha=f.lora_alpha, lora_dropout=f.lora_dropout, target_modules=targets, **common
        )
    try:
        return peft.get_peft_model(model, cfg)
    except ValueError as e:
        raise ToolkitError(f"cannot set up finetune.mode={f.mode} on {type(model).__name__}: {e}") from None


PEFT_TASK_TYPES = {  # the head class's suffix -> PEFT's task type
    "TokenClassification": "TOKEN_CLS",
    "QuestionAnswering": "QUESTION_ANS",
    "CausalLM": "CAUSAL_LM",
}


def default_prompt_text(data) -> str:
    if getattr(data, "prompt_text", None):
        return data.prompt_text
    if data.problem_type == "regression":
        return "Rate the text on a scale:"
    return f"Classify the text as {' or '.join(data.labels)}:"


def check_lengths(recipe, config) -> None:
    """task.max_seq_length (plus prompt tokens, which take positions) must fit the model."""
    from toolkit.models import max_positions

    f, task = recipe.finetune, recipe.task
    virtual = f.num_virtual_tokens if f.mode in ("prompt", "ptuning") else 0
    limit = max_positions(config)
    if task.max_seq_length + virtual > limit:
        extra = f" plus {virtual} virtual tokens" if virtual else ""
        raise ToolkitError(
            f"task.max_seq_length={task.max_seq_length}{extra} exceeds the {limit} positions of the model: "
            f"lower task.max_seq_length to {limit - virtual} or less"
        )


def fixed_padding(recipe, model) -> int | None:
    """Prompt tuning and P-tuning feed a decoder embeddings instead of token ids, so its head cannot
    find the last non-padding token and reads the last position: every example is then padded to
    task.max_seq_length, so that this position does not depend on the batch."""
    if recipe.finetune.mode in ("prompt", "ptuning") and is_decoder(model):
        return recipe.task.max_seq_length
    return None
