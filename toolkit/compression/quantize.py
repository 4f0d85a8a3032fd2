"""Post-training quantization through maintained libraries, applied as transformers loads the model.

    int8_dynamic  torchao `Int8DynamicActivationInt8WeightConfig`: int8 weights, activations quantized
                  per token at run time, int8 matrix products on the CPU (the successor of the
                  deprecated `torch.ao.quantization.quantize_dynamic`)
    bnb_8bit      bitsandbytes LLM.int8() weights (`load_in_8bit`)
    bnb_4bit      bitsandbytes NF4 weights with fp32 compute (`load_in_4bit`)

The classification head (and BERT's pooler) stays in full precision: it is tiny, and it is where
the decision is made. The full-precision folder stays the canonical model; each quantized model is
saved with `save_pretrained` into its own folder whose config.json records the quantization, so
that `AutoModelForSequenceClassification.from_pretrained(folder, device_map="cpu")` reloads it
quantized (torchao or bitsandbytes must be installed where it loads).
"""

from __future__ import annotations

from pathlib import Path

import torch

from toolkit.errors import ToolkitError

# Modules kept in full precision: classification heads (BERT's pooler sits inside its head).
KEEP_FULL_PRECISION = ["classifier", "pre_classifier", "score", "pooler", "lm_head", "cls", "generator_lm_head"]

LIBRARIES = {"int8_dynamic": "torchao", "bnb_8bit": "bitsandbytes", "bnb_4bit": "bitsandbytes"}


def quantization_config(scheme: str):
    """The transformers quantization config of a scheme."""
    from transformers import BitsAndBytesConfig, TorchAoConfig

    if scheme == "int8_dynamic":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig

        return TorchAoConfig(Int8DynamicActivationInt8WeightConfig(), modules_to_not_convert=KEEP_FULL_PRECISION)
    if scheme == "bnb_8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=KEEP_FULL_PRECISION)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.float32,
        llm_int8_skip_modules=KEEP_FULL_PRECISION,
    )


def check_scheme(scheme: str, device: str = "cpu") -> None:
    """Quantize and run one small Linear layer the way the scheme will, so that a missing library or
    hardware that cannot run the scheme stops the run before any real work, with the reason."""
    library = LIBRARIES[scheme]
    try:
        layer = torch.nn.Linear(64, 64)
        x = torch.randn(2, 64, device=device)
        if scheme == "int8_dynamic":
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

            model = torch.nn.Sequential(layer).to(device)
            quantize_(model, Int8DynamicActivationInt8WeightConfig())
            model(x)
        else:
            import bitsandbytes as bnb

            if scheme == "bnb_8bit":
                q = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False)
                q.weight = bnb.nn.Int8Params(layer.weight.data, requires_grad=False, has_fp16_weights=False)
            else:
                q = bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(layer.weight.data, requires_grad=False, quant_type="nf4")
            q.to(device)(x)
    except ImportError:
        raise ToolkitError(
            f"compress.schemes has {scheme}, which needs {library}: pip install {library}, or drop {scheme}"
        ) from None
    except Exception as e:  # the library is there but cannot run the scheme on this hardware
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ToolkitError(
            f"{library} cannot run {scheme} on this machine ({device}): {first}; drop {scheme} from compress.schemes"
        ) from None


def load_quantized(model_dir: str, scheme: str, auto_class):
    """The model in `model_dir`, quantized by `scheme` as it loads (on the CPU)."""
    return auto_class.from_pretrained(model_dir, quantization_config=quantization_config(scheme), device_map="cpu")


def reload(folder, auto_class):
    """A saved quantized folder, loaded the way its users will load it."""
    return auto_class.from_pretrained(str(folder), device_map="cpu")


# ---- the method: `toolkit compress` with compress.method=quantize ---------------------------------


def run(recipe, out: Path):
    """Each scheme applied as the model loads, saved, reloaded and measured beside the original."""
    from toolkit.compression.subject import conditions, is_main, load_input, load_model, save, subject_for

    model_dir, tokenizer, kind, auto_class = load_input(recipe)
    title = f"Quantization of {recipe.model.model_name_or_path}"
    if not is_main():  # nothing to train: the main process does it all
        return title, "", [], {}
    subject = subject_for(recipe, recipe.model.model_name_or_path, model_dir, kind, tokenizer)
    original = load_model(auto_class, model_dir)
    rows = [subject.measure("original", original, model_dir, "the full-precision input model (canonical weights)")]
    models = {"original": original}
    for scheme in recipe.compress.schemes:
        quantized = load_quantized(model_dir, scheme, auto_class)
        save(out / scheme, quantized, tokenizer)
        del quantized
        reloaded = reload(out / scheme, auto_class)  # what is measured is what users load
        models[scheme] = reloaded
        rows.append(subject.measure(scheme, reloaded, out / scheme, NOTES[scheme]))
    subject.time(rows)
    return title, conditions(recipe, subject, f"Schemes: {', '.join(recipe.compress.schemes)}."), rows, models


NOTES = {
    "int8_dynamic": "torchao int8 weights, int8 dynamic per-token activations; reload with "
    "AutoModel*.from_pretrained(folder, device_map='cpu') (torchao installed)",
    "bnb_8bit": "bitsandbytes LLM.int8() weights; reload with from_pretrained(folder) (bitsandbytes installed)",
    "bnb_4bit": "bitsandbytes NF4 weights, fp32 compute; reload with from_pretrained(folder) (bitsandbytes installed)",
}
