"""Fuzzing the corpus and table readers: every input is read or refused with a ToolkitError, never
another exception. Bounded in examples (the default tier runs a few dozen in all; the slow tier more)."""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from toolkit.errors import ToolkitError  # noqa: E402

FAST, SLOW = 12, 150
ROOT = tempfile.mkdtemp(prefix="fuzz-")  # one folder per example inside, removed after each case


def outcome(read) -> str:
    """'read' or 'refused'; any other exception fails the test (with its traceback)."""
    try:
        read()
    except ToolkitError:
        return "refused"
    return "read"


def corpus_file(name: str, data: bytes):
    from toolkit.data.corpus import load_documents

    folder = Path(tempfile.mkdtemp(dir=ROOT))
    (folder / name).write_bytes(data)
    return lambda: load_documents([folder / name], "text", "blank_line")


def table_file(name: str, data: bytes):
    from toolkit.finetuning.tasks import read_table

    folder = Path(tempfile.mkdtemp(dir=ROOT))
    (folder / name).write_bytes(data)
    return lambda: read_table(str(folder / name), None, "task.train_file")


@st.composite
def utf8_with_bad_bytes(draw) -> bytes:
    """Valid UTF-8 text (long enough to pass the first-64-KB check sometimes) with invalid sequences
    inserted at random offsets."""
    text = draw(st.text(min_size=1, max_size=200)).encode()
    repeat = draw(st.sampled_from([1, 10, 400]))
    data = bytearray(text * repeat)
    rng = random.Random(draw(st.integers(0, 2**32)))
    for _ in range(draw(st.integers(0, 3))):
        bad = rng.choice([b"\xff", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"\x80"])
        at = rng.randrange(len(data) + 1)
        data[at:at] = bad
    return bytes(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=5,
)


@st.composite
def json_lines(draw) -> bytes:
    rows = draw(
        st.lists(
            st.dictionaries(st.sampled_from(["text", "label", "body"]), json_values, max_size=3), min_size=1, max_size=8
        )
    )
    lines = [json.dumps(r) for r in rows]
    if draw(st.booleans()):  # a torn or garbled line somewhere
        at = draw(st.integers(0, len(lines) - 1))
        lines[at] = lines[at][: draw(st.integers(0, len(lines[at])))]
    return ("\n".join(lines) + "\n").encode()


@st.composite
def csv_tables(draw) -> bytes:
    cell = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)
    width = draw(st.integers(1, 3))
    header = draw(st.sampled_from([["text", "label", "x"][:width], [f"c{i}" for i in range(width)]]))
    rows = draw(st.lists(st.lists(cell, min_size=1, max_size=4), max_size=6))
    return "\n".join(",".join(r) for r in [header, *rows]).encode()


CASES = {
    "corpus: random bytes (.txt)": (st.binary(max_size=3000), lambda b: corpus_file("a.txt", b)),
    "corpus: UTF-8 with invalid sequences (.txt)": (utf8_with_bad_bytes(), lambda b: corpus_file("a.txt", b)),
    "corpus: random JSON lines (.jsonl)": (json_lines(), lambda b: corpus_file("a.jsonl", b)),
    "corpus: random CSV (.csv)": (csv_tables(), lambda b: corpus_file("a.csv", b)),
    "table: random JSON lines (.jsonl)": (json_lines(), lambda b: table_file("t.jsonl", b)),
    "table: random CSV (.csv)": (csv_tables(), lambda b: table_file("t.csv", b)),
    "table: random bytes (.csv)": (st.binary(max_size=2000), lambda b: table_file("t.csv", b)),
}


def fuzz(name: str, examples: int) -> Counter:
    import datasets

    datasets.disable_progress_bars()
    strategy, make = CASES[name]
    seen: Counter = Counter()

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(strategy)
    def check(data):
        seen[outcome(make(data))] += 1

    try:
        check()
    finally:
        for sub in Path(ROOT).iterdir():
            shutil.rmtree(sub, ignore_errors=True)
    print(f"\nfuzz {name}: {sum(seen.values())} trials, {sum(seen.values())} passed ({dict(seen)})")
    return seen


@pytest.mark.parametrize("name", list(CASES))
def test_fuzz_inputs_read_or_refused(name):
    seen = fuzz(name, FAST)
    assert sum(seen.values()) >= FAST // 2


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_fuzz_inputs_read_or_refused_many(name):
    seen = fuzz(name, SLOW)
    assert sum(seen.values()) >= SLOW // 2
