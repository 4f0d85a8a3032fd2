"""Tokenizer training with the `tokenizers` library.

WordPiece (BERT/ELECTRA: lower-casing, [CLS]/[SEP]/[MASK]/[PAD]/[UNK], `[CLS] A [SEP] B [SEP]`
template) or byte-level BPE (GPT-2 style, `<|endoftext|>` as end, padding and unknown token).
The result is saved as an ordinary transformers tokenizer: `AutoTokenizer.from_pretrained(dir)`
gives a `BertTokenizer` or `GPT2Tokenizer`.

WordPiece training in `tokenizers` numbers continuation pieces in hash-map order, so merges of
equal frequency were broken differently from run to run (seen: two different vocabularies from the
same corpus). Naming every continuation piece up front fixes their ids, and the vocabulary becomes a
function of the corpus alone. Byte-level BPE training is deterministic as it is.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from toolkit.errors import ToolkitError

WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BPE_END = "<|endoftext|>"


def train_tokenizer(
    texts: Iterable[str],
    kind: str = "wordpiece",
    vocab_size: int = 30522,
    lowercase: bool = True,
    min_frequency: int = 2,
    model_max_length: int = 512,
):
    """Train a tokenizer on an iterable of texts and wrap it as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if kind == "wordpiece":
        from transformers import BertTokenizer

        texts = texts if isinstance(texts, (list, tuple)) or hasattr(texts, "__len__") else list(texts)
        normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=None if lowercase else False)
        alphabet = _alphabet(texts, normalizer)
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            # Continuation pieces ("##e") are otherwise numbered in hash-map order, which breaks ties
            # between equally frequent merges differently from run to run: naming them up front makes
            # the vocabulary a function of the corpus alone.
            special_tokens=WORDPIECE_SPECIALS + ["##" + c for c in alphabet],
            initial_alphabet=alphabet,
            limit_alphabet=len(alphabet),
        )
        trained = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        trained.normalizer = normalizer
        trained.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trained.train_from_iterator(_nonempty(texts), trainer)
        # A fresh tokenizer with the trained vocabulary: only the five real special tokens are special.
        tok = Tokenizer(models.WordPiece(vocab=trained.get_vocab(), unk_token="[UNK]"))
        tok.normalizer = normalizer
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.add_special_tokens(WORDPIECE_SPECIALS)
        cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )
        tok.decoder = decoders.WordPiece()
        return BertTokenizer(tokenizer_object=tok, do_lower_case=lowercase, model_max_length=model_max_length)
    if kind == "bpe":
        from transformers import GPT2Tokenizer

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[BPE_END],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(_nonempty(texts), trainer)
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        tok.decoder = decoders.ByteLevel()
        return GPT2Tokenizer(
            tokenizer_object=tok,
            bos_token=BPE_END,
            eos_token=BPE_END,
            unk_token=BPE_END,
            pad_token=BPE_END,
            model_max_length=model_max_length,
        )
    raise ToolkitError(f"unknown tokenizer kind '{kind}': choose wordpiece or bpe")


def _alphabet(texts: Iterable[str], normalizer, limit: int = 1000) -> list[str]:
    """The corpus's characters after normalisation: the most frequent `limit` of them (as BERT's
    WordPiece training limits its alphabet), sorted so that their order never depends on the run."""
    from collections import Counter

    counts: Counter = Counter()
    for t in texts:
        if t:
            counts.update(normalizer.normalize_str(t))
    chars = [c for c in counts if not c.isspace()]
    chars.sort(key=lambda c: (-counts[c], c))
    return sorted(chars[:limit])


def _nonempty(texts: Iterable[str]) -> Iterator[str]:
    for t in texts:
        if t:
            yield t


def load_tokenizer(path: str | Path):
    """Load a saved tokenizer folder; a clear error when it is not one."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise ToolkitError(f"tokenizer folder not found: '{path}'")
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ToolkitError(f"'{path}' does not hold a tokenizer that transformers can load: {e}") from None
    if not tok.is_fast:
        raise ToolkitError(f"the tokenizer in '{path}' is not a fast tokenizer; the toolkit needs one")
    return tok


def separator_id(tokenizer) -> int:
    """The token that ends a document in a packed stream: [SEP] for BERT, the EOS token for GPT."""
    for tid in (tokenizer.sep_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return tid
    raise ToolkitError("the tokenizer has neither a separator nor an end-of-text token to mark document ends")


def load_model_tokenizer(model_dir: str, tokenizer_dir: str | None = None):
    """The checkpoint's tokenizer (or tokenizer_name_or_path); decoders without a pad token get their
    end-of-text token as padding."""
    source = tokenizer_dir or model_dir
    if tokenizer_dir is None and not (Path(model_dir) / "tokenizer_config.json").is_file():
        raise ToolkitError(
            f"'{model_dir}' holds no tokenizer: set model.tokenizer_name_or_path to the tokenizer folder"
        )
    tokenizer = load_tokenizer(source)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ToolkitError(f"the tokenizer in '{source}' has neither a padding nor an end-of-text token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def plain_backend(tokenizer):
    """The fast tokenizer's Rust backend without the padding and truncation that a saved
    `tokenizer.json` may carry (sentence-transformers models such as the shipped MiniLM save fixed
    padding to 128 and truncation at 128, which transformers overrides on every call but a direct
    `encode_batch` applies: [PAD] runs packed into blocks, long documents cut). The data path
    tokenizes whole documents and packs them itself, so it reads through this. A copy when the
    backend has either setting; the tokenizer itself is left as it is."""
    backend = tokenizer.backend_tokenizer
    if backend.padding is None and backend.truncation is None:
        return backend
    from tokenizers import Tokenizer

    plain = Tokenizer.from_str(backend.to_str())
    plain.no_padding()
    plain.no_truncation()
    return plain


def token_dtype(tokenizer) -> str:
    """The smallest Arrow integer type that holds every token id: uint16 below 65536 tokens (half
    the cache of int32), else int32. Readers widen to int64 when they make tensors."""
    return "uint16" if len(tokenizer) <= 2**16 else "int32"
