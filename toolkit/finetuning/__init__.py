"""Fine-tuning on labelled data: frozen feature extractor, full fine-tuning, PEFT prompt learning
(prompt, prefix, P-tuning), LoRA and QLoRA, on the shared training engine; `toolkit compare` runs
several modes side by side.

    data (tasks) -> model in its mode (modes, heads, prefix) -> objective -> engine -> outputs (card)
                                       frozen: features (cached) ---^
"""
