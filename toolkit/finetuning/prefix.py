"""Prefix tuning on transformers 5 models: the one-function fix.

PEFT's prefix tuning hands the trained key/value prefixes to the model as `past_key_values` and first
checks that the model's `forward` has a parameter of that name. transformers 5 renamed it `cache`
(the old name still works through a deprecation shim, but the signature no longer shows it), so PEFT
refuses with "Model does not support past key values which are required for prefix tuning" although
the models still attend over a cache correctly, encoders included.

`support_prefix_tuning(model)` gives the model instance a `forward` that accepts `past_key_values`
and passes it on as `cache`, and does nothing else. In particular the real tokens keep the positions
transformers gives them after a cache of P entries, P..P+n-1 (encoders included): that is PEFT's own
convention (what PEFT computes where it passes the prefix natively) and P-tuning v2's, so an adapter
trained here gives the same predictions wherever PEFT runs it. (An earlier version numbered an
encoder's tokens from 0; its adapters were trained for other positions and disagree with PEFT.)

Use it before `get_peft_model` when training and after `PeftModel.from_pretrained` when loading a
saved prefix adapter; models that already accept `past_key_values` are returned unchanged.
"""

from __future__ import annotations

import inspect


def support_prefix_tuning(model):
    """Make PEFT prefix tuning work on `model` (a transformers model or a PeftModel around one)."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    signature = inspect.signature(target.forward)
    backbone = inspect.signature(target.base_model.forward).parameters
    if "past_key_values" in signature.parameters or "cache" not in backbone:
        return model  # already works, or cannot attend over a cache at all (PEFT will say so)
    forward = target.forward

    def forward_with_prefix(*args, past_key_values=None, **kwargs):
        if past_key_values is not None:
            kwargs["cache"] = past_key_values
        return forward(*args, **kwargs)

    params = list(signature.parameters.values())
    extra = inspect.Parameter("past_key_values", inspect.Parameter.KEYWORD_ONLY, default=None)
    keep = [p for p in params if p.kind != inspect.Parameter.VAR_KEYWORD]
    variadic = [p for p in params if p.kind == inspect.Parameter.VAR_KEYWORD]
    # keyword-only parameters must follow every positional-or-keyword one
    positional = [p for p in keep if p.kind != inspect.Parameter.KEYWORD_ONLY]
    keyword = [p for p in keep if p.kind == inspect.Parameter.KEYWORD_ONLY]
    forward_with_prefix.__signature__ = signature.replace(parameters=[*positional, *keyword, extra, *variadic])
    forward_with_prefix.__doc__ = forward.__doc__
    target.forward = forward_with_prefix
    return model
