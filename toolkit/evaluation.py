"""Loss and perplexity of a pretrained model folder on text files (`toolkit evaluate`)."""

from __future__ import annotations

from pathlib import Path

from toolkit.errors import ToolkitError


def evaluate_model(
    model: str | Path,
    files: list[str],
    max_seq_length: int | None = None,
    batch_size: int = 32,
    text_field: str = "text",
    document_boundary: str = "blank_line",
    seed: int = 42,
    segments: int = 2,
) -> dict:
    """Evaluate a saved masked-LM or causal-LM folder on the blocks of `files`.

    Masked LMs are scored with the same seeded masking as validation during pretraining, on blocks of
    `segments` segments (2: `[CLS] A [SEP] B [SEP]`, as pretraining builds them by default).
    """
    import transformers

    from toolkit.config import DataArgs, ObjectiveArgs
    from toolkit.data.blocks import prepare_blocks
    from toolkit.data.loader import BlockDataset, ShardSampler, make_loader
    from toolkit.engine.loop import evaluate
    from toolkit.models import check_model_dir, max_positions
    from toolkit.objectives import OBJECTIVES
    from toolkit.tokenizer import load_tokenizer

    check_model_dir(str(model))
    config = transformers.AutoConfig.from_pretrained(str(model))
    if "ElectraForPreTraining" in (config.architectures or []):
        raise ToolkitError(
            f"'{model}' is an ELECTRA discriminator, which has no masked-LM head: evaluate its generator "
            f"instead ('{Path(model) / 'generator'}')"
        )
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in (config.architectures or []))
    name = "clm" if causal else "mlm"
    objective_cls = OBJECTIVES[name]
    tokenizer = load_tokenizer(model)
    length = max_seq_length or min(tokenizer.model_max_length, max_positions(config), 512)
    data = DataArgs(
        train_files=list(files),
        validation_split_percentage=0,
        max_seq_length=length,
        text_field=text_field,
        document_boundary=document_boundary,
        segments=segments,
    )
    blocks = prepare_blocks(data, tokenizer, seed, segments=segments if objective_cls.two_segments else 1)
    try:
        hf_model = getattr(transformers, objective_cls.auto_class).from_pretrained(str(model))
    except ValueError as e:
        raise ToolkitError(f"cannot load '{model}' as a {objective_cls.auto_class}: {e}") from None
    objective = objective_cls(hf_model, ObjectiveArgs(name=name))
    from accelerate import Accelerator

    from toolkit.engine.loop import reset_accelerate_state

    reset_accelerate_state()
    accelerator = Accelerator()
    loader = make_loader(
        BlockDataset(blocks.train),
        ShardSampler(len(blocks.train), batch_size),
        objective.make_collator(tokenizer, seed, salt="eval"),
    )
    metrics = evaluate(objective, objective, loader, accelerator)
    metrics.update(objective=name, blocks=len(blocks.train), max_seq_length=length)
    return metrics
