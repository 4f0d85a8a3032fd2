"""Model configs: size presets x architectures, plus loading from a local checkpoint.

Sizes are the published BERT family dimensions (Turc et al., 2019, "Well-Read Students Learn
Better"; BERT-Base/Large from Devlin et al.): layers x hidden, heads = hidden / 64, feed-forward
= 4 x hidden. Each architecture maps them onto its own transformers config.

ELECTRA (the discriminator; its generator is sized by the rtd objective) has its own three models
(Clark et al., 2020; google-research/electra `get_bert_config`), and for `architecture: electra`
those names mean them: `small` is ELECTRA-Small (12 layers x 256, 4 heads, embeddings 128: not
BERT-Small's 4 x 512), `base` is ELECTRA-Base (12 x 768, 12 heads, embeddings 768) and `large` is
ELECTRA-Large (24 x 1024, 16 heads, embeddings 1024), the same dimensions as BERT-Base/-Large. The
other presets (tiny, mini, medium) are BERT's, with the embeddings factorised to 128 up to hidden 256.

Attention uses PyTorch's scaled-dot-product kernel (`sdpa`): blocks are packed without padding
(two-segment blocks but for the 5% drawn shorter), so a batch without padding passes no attention
mask and SDPA dispatches to its fastest (flash / memory-efficient) kernel on GPUs and to the fused
CPU kernel here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from toolkit.errors import ToolkitError

SIZES = {  # name: (layers, hidden)
    "tiny": (2, 128),
    "mini": (4, 256),
    "small": (4, 512),
    "medium": (8, 512),
    "base": (12, 768),
    "large": (24, 1024),
}
# ELECTRA's own models where their names mean other dimensions than BERT's (only Small does).
ELECTRA_SIZES = {**SIZES, "small": (12, 256)}


def preset(architecture: str, size: str) -> tuple[int, int]:
    """(layers, hidden) of a size preset for an architecture."""
    return (ELECTRA_SIZES if architecture == "electra" else SIZES)[size]


ATTN_IMPLEMENTATION = "sdpa"


@dataclass(frozen=True)
class Architecture:
    config_class: str  # name in transformers
    tokenizer_kind: str  # wordpiece | bpe
    is_decoder: bool

    def config_kwargs(self, layers: int, hidden: int, max_positions: int) -> dict:
        heads = max(1, hidden // 64)
        if self.config_class == "GPT2Config":
            return dict(n_layer=layers, n_embd=hidden, n_head=heads, n_inner=4 * hidden, n_positions=max_positions)
        kwargs = dict(
            num_hidden_layers=layers,
            hidden_size=hidden,
            num_attention_heads=heads,
            intermediate_size=4 * hidden,
            max_position_embeddings=max_positions,
        )
        if self.config_class == "ElectraConfig":
            # ELECTRA-Small (hidden 256) factorises its embeddings to 128; Base and Large do not.
            kwargs["embedding_size"] = min(hidden, 128) if hidden <= 256 else hidden
        return kwargs


ARCHITECTURES = {
    "bert": Architecture("BertConfig", "wordpiece", is_decoder=False),
    "gpt2": Architecture("GPT2Config", "bpe", is_decoder=True),
    "electra": Architecture("ElectraConfig", "wordpiece", is_decoder=False),
}


def build_config(architecture: str, size: str, tokenizer, max_seq_length: int, overrides: dict):
    """A fresh transformers config sized by preset, fitted to the tokenizer, then overridden."""
    import transformers

    arch = ARCHITECTURES[architecture]
    layers, hidden = preset(architecture, size)
    max_positions = max(512 if not arch.is_decoder else 1024, max_seq_length)
    kwargs = arch.config_kwargs(layers, hidden, max_positions)
    kwargs.update(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id if arch.is_decoder else None,
        eos_token_id=tokenizer.eos_token_id if arch.is_decoder else None,
    )
    config = getattr(transformers, arch.config_class)(**kwargs)
    apply_overrides(config, overrides)
    if config.vocab_size < len(tokenizer):
        raise ToolkitError(
            f"model.config_overrides.vocab_size={config.vocab_size} is smaller than the tokenizer's "
            f"{len(tokenizer)} tokens: remove the override or raise it"
        )
    return config


def apply_overrides(config, overrides: dict) -> None:
    for key, value in (overrides or {}).items():
        if not hasattr(config, key):
            raise ToolkitError(
                f"model.config_overrides: '{key}' is not a field of {type(config).__name__}; "
                "see the transformers documentation of that config for valid names"
            )
        setattr(config, key, value)


def load_config(path: str, overrides: dict):
    from transformers import AutoConfig

    check_model_dir(path)
    config = AutoConfig.from_pretrained(path)
    apply_overrides(config, overrides)
    return config


def check_model_dir(path: str) -> None:
    p = Path(path)
    if not p.is_dir():
        raise ToolkitError(f"model folder not found: '{path}' (model.model_name_or_path must be a local folder)")
    if not (p / "config.json").is_file():
        raise ToolkitError(f"'{path}' is not a Hugging Face model folder: it has no config.json")


def max_positions(config) -> int:
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 512


def is_causal_lm(config) -> bool:
    """Whether a checkpoint's config describes a causal LM (rather than a masked LM): its saved
    architecture (GPT2LMHeadModel, LlamaForCausalLM), else whether transformers only knows a causal
    LM for its model type."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    names = getattr(config, "architectures", None) or []
    if names:
        return any(n.endswith(("ForCausalLM", "LMHeadModel")) for n in names)
    kind = getattr(config, "model_type", None)
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def random_twin(model_dir: str, out: Path, seed: int) -> Path:
    """A checkpoint's architecture, config and tokenizer with freshly initialised weights (the floor a
    pretrained model must beat), saved to `out`."""
    import shutil

    import torch
    import transformers

    from toolkit.tokenizer import load_model_tokenizer

    check_model_dir(model_dir)
    config = transformers.AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(seed)
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    model = cls(config) if cls is not None else transformers.AutoModel.from_config(config)
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    load_model_tokenizer(model_dir).save_pretrained(out)
    return out
