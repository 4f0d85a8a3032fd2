"""toolkit: pretrain BERT/ELECTRA/GPT-style language models on your own text, then fine-tune them.

Python API (each returns the output folder and final metrics):

    import toolkit
    result = toolkit.pretrain("recipes/bert-mlm.yaml", training__max_steps=50)
    tuned = toolkit.finetune("recipes/finetune-lora.yaml", model__model_name_or_path=str(result.output_dir))
    table = toolkit.compare("recipes/finetune-compare.yaml").table
    report = toolkit.compress("recipes/compress-quantize.yaml").table
    scores = toolkit.benchmark(str(result.output_dir), seeds=1)  # the downstream task suite
"""

import logging as _logging

__version__ = "0.1.0"

# transformers imports torchao when it is installed; on a machine without its CUDA kernels that
# prints load failures and deprecation notices that say nothing about the user's run.
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)


def pretrain(recipe=None, overrides=None, **kwargs):
    """Pretrain from a recipe with overrides; see `toolkit.pretrain.pretrain`."""
    from toolkit.pretraining import pretrain as _pretrain

    return _pretrain(recipe, overrides, **kwargs)


def evaluate(model, files, **kwargs) -> dict:
    """Loss/perplexity of a saved model on text files; see `toolkit.evaluate.evaluate_model`."""
    from toolkit.evaluation import evaluate_model

    return evaluate_model(model, files, **kwargs)


def finetune(recipe=None, overrides=None, **kwargs):
    """Fine-tune a checkpoint on labelled data; see `toolkit.finetuning.pipeline.finetune`."""
    from toolkit.finetuning.pipeline import finetune as _finetune

    return _finetune(recipe, overrides, **kwargs)


def compare(recipe=None, overrides=None, **kwargs):
    """Run several fine-tuning modes side by side; returns the table (`.table`) and its paths."""
    from toolkit.finetuning.compare import compare as _compare

    return _compare(recipe, overrides, **kwargs)


def compress(recipe=None, overrides=None, **kwargs):
    """Quantize, prune or distill a model and write the size/speed/accuracy report; see
    `toolkit.compression.pipeline.compress`."""
    from toolkit.compression.pipeline import compress as _compress

    return _compress(recipe, overrides, **kwargs)


def benchmark(model, suite=None, seeds=None, modes=None, output_dir=None, overrides=None, against_random_init=False):
    """Fine-tune a checkpoint on every task of a suite (default: recipes/suite-default.yaml) with several
    seeds, optionally beside its random-init twin; returns the table (`.table`, `.rows`, `.versus`,
    `.summary()`); see `toolkit.benchmarking.benchmark`."""
    from toolkit.benchmarking import benchmark as _benchmark

    return _benchmark(model, suite, seeds, modes, output_dir, overrides, against_random_init)


def study(recipe=None, overrides=None, **kwargs):
    """Compare pretraining objectives at equal FLOPs on a task suite; returns the table (`.rows`,
    `.summary()`); see `toolkit.studies.study`."""
    from toolkit.studies import study as _study

    return _study(recipe, overrides, **kwargs)


def predict(model, file, output=None, **kwargs):
    """Label every row of a file with a fine-tuned folder; returns (output path, metrics)."""
    from toolkit.finetuning.predict import predict as _predict

    return _predict(model, file, output, **kwargs)


def train_tokenizer(texts, kind="wordpiece", vocab_size=30522, **kwargs):
    """Train a WordPiece or byte-level BPE tokenizer on an iterable of texts."""
    from toolkit.tokenizer import train_tokenizer as _train

    return _train(texts, kind, vocab_size, **kwargs)


__all__ = [
    "pretrain",
    "evaluate",
    "finetune",
    "compare",
    "compress",
    "benchmark",
    "predict",
    "train_tokenizer",
    "__version__",
]
