"""Built-in suite tasks and `toolkit benchmark`: real data from installed packages, tiny models."""

from __future__ import annotations

import pytest

from toolkit.finetuning.config import TaskArgs
from toolkit.finetuning.tasks import NEAR_NEUTRAL, load_task


def test_question_type_has_six_coarse_classes_and_no_question_in_two_splits():
    data = load_task(TaskArgs(name="question-type"))
    assert data.labels == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    assert sum(data.rows.values()) == 5381  # each TREC training question once (the file repeats them)
    train, test = set(data.train["text"]), set(data.test["text"]) | set(data.validation["text"])
    assert not train & test
    assert set(data.test["labels"]) == set(range(6))  # stratified: even ABBR (86 rows) reaches test


@pytest.mark.parametrize(("name", "total", "kept"), [("amazon-sentiment", 3708, 2985), ("tweet-sentiment", 4200, 3432)])
def test_vader_domains_drop_near_neutral_sentences(name, total, kept):
    import csv

    from toolkit.finetuning.tasks import BUILTIN_TASKS
    from toolkit.paths import resolve_path

    data = load_task(TaskArgs(name=name))
    assert sum(data.rows.values()) == kept
    path = resolve_path(BUILTIN_TASKS[name].train_file)
    with open(path, encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert len(rows) == total
    ratings: dict = {}  # a few short snippets ("!") occur more than once, with different ratings
    for r in rows:
        ratings.setdefault(r["text"], []).append(float(r["sentiment"]))
    for text, label in zip(data.train["text"], data.train["labels"]):
        # kept only with a clear sign, and "positive" (class 1) exactly when the mean rating is above 0
        assert any(abs(x) >= NEAR_NEUTRAL and (x > 0) == (label == 1) for x in ratings[text])
    assert sum(abs(x[0]) < NEAR_NEUTRAL for x in ratings.values()) > 0.1 * len(ratings)  # there was something to drop
