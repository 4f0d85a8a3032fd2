"""Few-shot runs (`task.shots: K`): K training examples per class, drawn by seed, and a validation set
of K per class drawn the same way (LM-BFF, Gao et al. 2021: model selection on a full validation set
would use more labels than the few shots). The test split stays whole, so runs with different seeds
are scored on the same examples; the samples come from the training and validation splits only, so
they never overlap the test split."""

from __future__ import annotations

import numpy as np

from toolkit.errors import ToolkitError


def per_class(labels: list[int], k: int, seed: int, split: str, names: list[str], strict: bool) -> list[int]:
    """Row indices of k examples of every class (sorted), the same for the same seed."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    keep = []
    for c in range(len(names)):
        rows = np.flatnonzero(labels == c)
        if strict and len(rows) < k:
            raise ToolkitError(
                f"task.shots={k} but the {split} split has only {len(rows)} examples of class {names[c]!r}: "
                "lower task.shots or add data"
            )
        keep += rng.permutation(rows)[:k].tolist()
    return sorted(keep)


def sample_shots(data, k: int, seed: int) -> None:
    """Replace the task's train (and validation) split by K examples per class, in place."""
    if data.problem_type != "classification":
        raise ToolkitError("task.shots (K examples per class) needs a classification task")
    data.train = data.train.select(per_class(data.train["labels"][:], k, seed, "training", data.labels, True))
    data.rows["train"] = len(data.train)
    if data.validation is not None:
        rows = per_class(data.validation["labels"][:], k, seed + 1, "validation", data.labels, False)
        data.validation = data.validation.select(rows)
        data.rows["validation"] = len(data.validation)
    data.notes.append(f"few-shot: {k} examples per class for training and validation (seed {seed})")
