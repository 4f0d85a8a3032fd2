"""Memory levers of the engine (the others live in the launch config: ZeRO stages, offload, FSDP).

Gradient checkpointing keeps only each layer's input during the forward pass and recomputes the
rest during the backward pass: activation memory falls from O(layers x activations) to about one
layer's worth, for roughly a third more compute. The non-reentrant variant is used (PyTorch's
recommendation): it gives the same gradients as no checkpointing and needs no trick when a layer's
inputs do not require gradients, which is the case with frozen embeddings under PEFT (LoRA, prompt
tuning); with the reentrant variant that case returned no gradients for the adapters unless the
inputs were made to require them.
"""

from __future__ import annotations

from torch import nn

from toolkit.errors import ToolkitError


def enable_gradient_checkpointing(objective: nn.Module) -> list[str]:
    """Turn on gradient checkpointing in every transformers model an objective trains (PEFT models
    forward the call to their base model). Returns the names of the models it was enabled in."""
    models = objective.hf_models() if hasattr(objective, "hf_models") else {"": objective}
    done = []
    for name, model in models.items():
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ToolkitError(
                f"training.gradient_checkpointing=true: {type(model).__name__} does not support gradient "
                "checkpointing; set it to false"
            )
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        done.append(name or type(model).__name__)
    return done
