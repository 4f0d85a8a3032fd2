"""Task metrics as `evaluate` modules, computed by scikit-learn and SciPy.

`evaluate.load("accuracy")` fetches its script from the Hugging Face Hub, so it fails offline. These
are the same metrics defined locally as `evaluate.Metric` subclasses (they work wherever an
`evaluate` module does: `add_batch`, `compute`), each a thin call into a maintained implementation:
accuracy, macro-F1 and Matthews correlation for classification; Pearson and Spearman correlation
(and the mean squared error) for regression.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np
import torch


def _features(dtype: str):
    return datasets.Features({"predictions": datasets.Value(dtype), "references": datasets.Value(dtype)})


class _Metric(evaluate.Metric):
    dtype = "int64"
    description = ""

    def __init__(self, **kwargs):
        kwargs.setdefault("keep_in_memory", True)
        super().__init__(**kwargs)

    def _info(self):
        return evaluate.MetricInfo(
            description=self.description, citation="", inputs_description="", features=_features(self.dtype)
        )


class Accuracy(_Metric):
    description = "Share of predictions equal to the reference (sklearn.metrics.accuracy_score)."

    def _compute(self, predictions, references):
        from sklearn.metrics import accuracy_score

        return {"accuracy": float(accuracy_score(references, predictions))}


class MacroF1(_Metric):
    description = "Unweighted mean of the per-class F1 scores (sklearn.metrics.f1_score, average='macro')."

    def _compute(self, predictions, references):
        from sklearn.metrics import f1_score

        return {"macro_f1": float(f1_score(references, predictions, average="macro", zero_division=0))}


class MatthewsCorrelation(_Metric):
    description = "Matthews correlation coefficient (sklearn.metrics.matthews_corrcoef)."

    def _compute(self, predictions, references):
        from sklearn.metrics import matthews_corrcoef

        return {"mcc": float(matthews_corrcoef(references, predictions))}


class PearsonR(_Metric):
    dtype = "float64"
    description = "Pearson correlation of predictions and references (scipy.stats.pearsonr)."

    def _compute(self, predictions, references):
        from scipy.stats import pearsonr

        return {"pearson": _correlation(pearsonr, predictions, references)}


class SpearmanR(_Metric):
    dtype = "float64"
    description = "Spearman rank correlation of predictions and references (scipy.stats.spearmanr)."

    def _compute(self, predictions, references):
        from scipy.stats import spearmanr

        return {"spearman": _correlation(spearmanr, predictions, references)}


class MeanSquaredError(_Metric):
    dtype = "float64"
    description = "Mean squared error (sklearn.metrics.mean_squared_error)."

    def _compute(self, predictions, references):
        from sklearn.metrics import mean_squared_error

        return {"mse": float(mean_squared_error(references, predictions))}


def _correlation(fn, predictions, references) -> float:
    if np.std(predictions) == 0 or np.std(references) == 0:
        return 0.0  # undefined for a constant series; 0 = no linear/rank relation shown
    return float(fn(predictions, references)[0])


CLASSIFICATION = (Accuracy, MacroF1, MatthewsCorrelation)
REGRESSION = (PearsonR, SpearmanR, MeanSquaredError)


def compute(problem_type: str, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """All metrics of the problem type from gathered logits and labels."""
    if problem_type == "regression":
        predictions, modules = logits.squeeze(-1).double().numpy(), REGRESSION
        references = labels.double().numpy()
    else:
        predictions, modules = logits.argmax(-1).numpy(), CLASSIFICATION
        references = labels.long().numpy()
    out: dict[str, float] = {}
    for module in modules:
        out.update(module().compute(predictions=predictions, references=references))
    return out


def main_metric(problem_type: str) -> str:
    """The metric a comparison ranks by."""
    return {"regression": "pearson", "question_answering": "f1", "generation": "perplexity"}.get(
        problem_type, "accuracy"
    )
