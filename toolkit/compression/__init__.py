"""Model compression: quantization, pruning and knowledge distillation, with a before/after report.

config.py      the recipe: `toolkit compress RECIPE [key=value ...]`
pipeline.py    recipe -> checks -> model and data -> compressed model(s) -> report
quantize.py    torchao int8 dynamic, bitsandbytes 8-bit and 4-bit (applied as the model loads)
prune.py       global unstructured magnitude pruning, made permanent before saving
structured.py  removing whole attention heads and feed-forward neurons (pruned_modeling.py ships
               beside models whose heads were removed)
distill.py     teacher -> student objectives on the shared engine, and building the student
measure.py     parameters, size on disk, CPU latency, quality, agreement with the original
report.py      report.md, report.csv, report.png
"""
