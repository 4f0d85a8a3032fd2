"""Continued (domain-adaptive) pretraining from a checkpoint on disk: the BioBERT / LegalBERT route.

Two things a checkpoint may need before it can go on pretraining on the user's corpus:

- **A masked-LM head.** Encoders published for embeddings (a `BertModel`, such as the shipped MiniLM)
  have none. `AutoModelForMaskedLM` adds one: the encoder's weights load, the decoder is the input
  embedding matrix (tied, as BERT's), and only the small transform layer (dense + LayerNorm) and the
  output bias start fresh. `load_pretrained` checks the tie and says which weights are new.
- **Words of the new domain** (`tokenizer.extend_vocab: N`). The up-to-N words most frequent in the
  corpus that the tokenizer splits into several pieces join its WordPiece vocabulary as whole words;
  each new embedding row (and output bias) starts at the mean of the rows of the pieces the word was
  split into, so nothing starts random (the initialisation of Gururangan-style domain adaptation with
  vocabulary extension, e.g. exBERT / "AVocaDo"). The extended tokenizer is saved with the model.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

from toolkit.errors import ToolkitError

MIN_WORD_COUNT = 2  # a word seen once is no evidence of a domain term


def base_tokenizer(recipe):
    """An existing tokenizer a pretraining run starts from: tokenizer.path, else the checkpoint's;
    None: the run trains one."""
    from toolkit.paths import resolve_path
    from toolkit.tokenizer import load_tokenizer

    if recipe.tokenizer.path:
        return load_tokenizer(resolve_path(recipe.tokenizer.path))
    src = recipe.model.model_name_or_path
    if src and (Path(resolve_path(src)) / "tokenizer_config.json").is_file():
        return load_tokenizer(resolve_path(src))
    if recipe.tokenizer.extend_vocab:
        raise ToolkitError(
            f"tokenizer.extend_vocab needs the checkpoint's tokenizer, but '{src}' holds none: set tokenizer.path"
        )
    return None


def load_pretrained(auto, path: str, config, objective: str):
    """`auto.from_pretrained(path)`, saying which weights start fresh; a masked-LM head added to a
    checkpoint without one has its decoder tied to the input embeddings (checked, not assumed)."""
    from toolkit.hf import quiet_transformers
    from toolkit.models import ATTN_IMPLEMENTATION

    try:
        with quiet_transformers():
            model, info = auto.from_pretrained(
                path, config=config, attn_implementation=ATTN_IMPLEMENTATION, output_loading_info=True
            )
    except ValueError as e:
        raise ToolkitError(f"cannot load '{path}' for objective '{objective}' ({auto.__name__}): {e}") from None
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        head = mlm_head_parts(model)
        if head is not None and any(k.startswith(head[2]) for k in missing):
            embeddings, decoder, prefix = head
            model.tie_weights()
            if decoder.weight.data_ptr() != embeddings.weight.data_ptr():
                raise ToolkitError(
                    f"'{path}' has no masked-LM head and its config unties word embeddings "
                    "(tie_word_embeddings: false): set model.config_overrides.tie_word_embeddings=true"
                )
            print(
                f"'{path}' has no masked-LM head: added one whose decoder is tied to the input embeddings; "
                f"its transform layer and output bias are freshly initialised ({', '.join(missing)})"
            )
        else:
            print(f"'{path}': freshly initialised weights not in the checkpoint: {', '.join(missing)}")
    return model


def mlm_head_parts(model):
    """(input embeddings, decoder Linear, head's key prefix) of a masked-LM model; None for others."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is None or getattr(model.config, "model_type", "") not in ("bert", "roberta", "xlm-roberta", "camembert"):
        return None
    prefix = "cls.predictions" if hasattr(model, "cls") else "lm_head"
    return model.get_input_embeddings(), out, prefix


# ---- vocabulary extension ----------------------------------------------------------------------


def words(tokenizer, texts) -> Counter:
    """Counts of the words the tokenizer's own normaliser and pre-tokeniser make of `texts`."""
    backend = tokenizer.backend_tokenizer
    counts: Counter = Counter()
    for text in texts:
        if not text:
            continue
        if backend.normalizer is not None:
            text = backend.normalizer.normalize_str(text)
        counts.update(w for w, _ in backend.pre_tokenizer.pre_tokenize_str(text))
    return counts


def split_words(tokenizer, texts, limit: int) -> list[str]:
    """The up-to-`limit` alphabetic words most frequent in `texts` (seen at least twice) that the
    tokenizer splits into several pieces; ties broken alphabetically, so the choice is reproducible."""
    model = tokenizer.backend_tokenizer.model
    found = []
    for word, n in sorted(words(tokenizer, texts).items(), key=lambda kv: (-kv[1], kv[0])):
        if n < MIN_WORD_COUNT or len(found) >= limit:
            break
        if word.isalpha() and len(model.tokenize(word)) > 1:
            found.append(word)
    return found


def extend_tokenizer(tokenizer, texts, limit: int):
    """(tokenizer with the new words in its WordPiece vocabulary, the words added). The words become
    ordinary vocabulary entries (not "added tokens", which would also match inside longer words)."""
    from toolkit.tokenizer import load_tokenizer

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    if state["model"]["type"] != "WordPiece":
        raise ToolkitError(
            f"tokenizer.extend_vocab works on WordPiece tokenizers (BERT, ELECTRA); this one is "
            f"{state['model']['type']}: set tokenizer.extend_vocab=0"
        )
    new = split_words(tokenizer, texts, limit)
    if not new:
        return tokenizer, []
    vocab = state["model"]["vocab"]
    next_id = max(tokenizer.get_vocab().values()) + 1
    for i, word in enumerate(new):
        vocab[word] = next_id + i
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        (Path(tmp) / "tokenizer.json").write_text(json.dumps(state, ensure_ascii=False))
        vocab_txt = Path(tmp) / "vocab.txt"
        if vocab_txt.is_file():  # kept in step with tokenizer.json: the slow tokenizer reads it
            ids = {**tokenizer.get_vocab(), **{w: next_id + i for i, w in enumerate(new)}}
            vocab_txt.write_text("".join(t + "\n" for t, _ in sorted(ids.items(), key=lambda kv: kv[1])))
        extended = load_tokenizer(tmp)
    return extended, new


def init_new_rows(model, base_tokenizer, tokenizer) -> int:
    """Grow the model's vocabulary to the tokenizer's; each new row of the input embeddings (and of
    the output bias, where the head has one) is the mean of the rows of the pieces `base_tokenizer`
    splits that word into. Returns the number of rows added."""
    import torch

    old = model.get_input_embeddings().weight.shape[0]
    new = len(tokenizer)
    if new <= old:
        return 0
    model.resize_token_embeddings(new, mean_resizing=False)
    inv = {i: t for t, i in tokenizer.get_vocab().items()}
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    bias = getattr(out, "bias", None) if out is not None else None
    weight = model.get_input_embeddings().weight
    with torch.no_grad():
        for row in range(old, new):
            pieces = [t.id for t in base_tokenizer.backend_tokenizer.model.tokenize(inv[row])]
            weight[row] = weight[pieces].mean(0)
            if out is not None and out.weight.data_ptr() != weight.data_ptr():  # an untied decoder
                out.weight[row] = out.weight[pieces].mean(0)
            if bias is not None:
                bias[row] = bias[pieces].mean(0)
    return new - old
