"""Replaced-token detection (ELECTRA: Clark et al., 2020; google-research/electra).

Two networks train together from step 0, in one forward and with one optimizer:

- the **generator** (`ElectraForMaskedLM`): as deep as the discriminator, hidden size a fraction of
  its width, heads = hidden / 64, feed-forward 4 x hidden; it fills in masked tokens;
- the **discriminator** (`ElectraForPreTraining`): reads the text in which the masked positions hold
  tokens sampled from the generator, and tells for every token whether it was replaced.

They share one embeddings module (word, position and token-type embeddings and their layer norm:
the same tensors, not copies), and the generator's output layer is tied to the word embeddings.

Sizes as ELECTRA (`configure_pretraining.py`, Table 6 of the paper) unless the recipe sets them:
the generator is 1/4 of the discriminator's width for ELECTRA-Small and -Large and 1/3 for
ELECTRA-Base (`objective.generator_hidden_fraction`), and ELECTRA-Large masks 25% of the tokens
instead of 15% (`objective.mlm_probability`). Which ELECTRA model a discriminator is follows from
`model.size` (or, for a checkpoint, from its depth and width); other sizes take 1/4 and 15%.

Masking as ELECTRA: 15% of tokens selected (special tokens and padding never; ELECTRA's exact
count, round(0.15 x length), with `objective.masking=fixed_count`), 85% of those become [MASK] and
15% stay as they are, none random. The replacements are drawn by Gumbel-max at
temperature 1 in fp32 from the generator's logits. They are token ids, so no gradient flows from
the discriminator into the generator through them (the shared embeddings do get gradients from
both losses, as in ELECTRA). A sample equal to the original token counts as original.

Loss = generator masked-LM cross-entropy (mean over masked tokens) + 50 x discriminator binary
cross-entropy (mean over all non-padding tokens, [CLS] and [SEP] included, as in ELECTRA).

Randomness: the Gumbel noise of each example comes from a generator seeded by (seed, epoch, example
index) (the collator hands the seed over), like the masking; replacements therefore do not depend
on the process, the batch or a resume. It costs one small RNG call per example.

Outputs: the discriminator, the model to fine-tune, at `output_dir` (it also loads with
`AutoModelForSequenceClassification`, whose classification head starts untrained); the generator
at `output_dir/generator` (`AutoModelForMaskedLM`). Both come with the tokenizer.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from toolkit.data.collators import ReplacedTokenCollator
from toolkit.errors import ToolkitError
from toolkit.objectives.base import Objective, perplexity, strip_prefix
from toolkit.objectives.mlm import masked_lm_logits, token_loss

_USAGE = """import torch
from transformers import AutoTokenizer, ElectraForPreTraining, pipeline
tok = AutoTokenizer.from_pretrained("{path}")
discriminator = ElectraForPreTraining.from_pretrained("{path}")
batch = tok("to be or not to be, that is the banana.", return_tensors="pt")
replaced = discriminator(**batch).logits[0] > 0  # True where a token looks replaced
print([t for t, r in zip(tok.convert_ids_to_tokens(batch["input_ids"][0]), replaced) if r])
# Fine-tune the discriminator: AutoModelForSequenceClassification.from_pretrained("{path}", num_labels=2)
fill = pipeline("fill-mask", model="{path}/generator")  # the generator is a small masked LM
print(fill("to be or not to be, that is the [MASK]."))"""


# ELECTRA's settings per model (configure_pretraining.py: generator_hidden_size 0.25 by default,
# 0.33333 for base; mask_prob 0.15 by default, 0.25 for large).
GENERATOR_FRACTION = {"small": 1 / 4, "base": 1 / 3, "large": 1 / 4}
MASK_PROBABILITY = {"large": 0.25}


def electra_model(config) -> str | None:
    """Which ELECTRA model (small, base, large) a discriminator config has the depth and width of."""
    from toolkit.models import ELECTRA_SIZES

    for name in GENERATOR_FRACTION:
        if (config.num_hidden_layers, config.hidden_size) == ELECTRA_SIZES[name]:
            return name
    return None


def generator_fraction(size: str | None, args) -> float:
    """objective.generator_hidden_fraction, or ELECTRA's for the size (1/4 when it is not one of ELECTRA's)."""
    if args.generator_hidden_fraction is not None:
        return args.generator_hidden_fraction
    return GENERATOR_FRACTION.get(size, 1 / 4)


def mask_probability(size: str | None, args) -> float:
    """objective.mlm_probability, or ELECTRA's for the size (0.25 for large, else 0.15)."""
    if args.mlm_probability is not None:
        return args.mlm_probability
    return MASK_PROBABILITY.get(size, 0.15)


def generator_shape(hidden_size: int, fraction: float) -> tuple[int, int]:
    """(hidden size, attention heads) of the generator, as in ELECTRA's `get_generator_config`."""
    hidden = int(round(hidden_size * fraction))
    heads = max(1, hidden // 64)
    if hidden < 1 or hidden % heads:
        raise ToolkitError(
            f"a generator {fraction:.4g} as wide as the discriminator has hidden size {hidden} (from {hidden_size}), "
            f"which {heads} attention heads cannot split evenly: set objective.generator_hidden_fraction to a "
            "fraction that gives a multiple of 64 (or less than 64), e.g. 0.25"
        )
    return hidden, heads


def generator_config(config, fraction: float):
    """The discriminator's config, narrowed: same depth, vocabulary, embeddings and dropout."""
    hidden, heads = generator_shape(config.hidden_size, fraction)
    gen = copy.deepcopy(config)
    gen.hidden_size, gen.num_attention_heads, gen.intermediate_size = hidden, heads, 4 * hidden
    gen.architectures = None
    return gen


def share_embeddings(generator, discriminator) -> None:
    """One embeddings module for both networks, and the generator's output layer tied to it."""
    generator.electra.embeddings = discriminator.electra.embeddings
    generator.tie_weights()  # transformers 5: otherwise the LM head keeps the replaced embedding matrix


def gumbel_max(logits: torch.Tensor, rows_per_example: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """One token per row of `logits`, sampled from softmax(logits) (temperature 1) as
    argmax(logits + Gumbel noise) in fp32. Rows are grouped by example (`rows_per_example`); each
    example's uniform noise comes from its own generator, seeded by `seeds`."""
    device, vocab = logits.device, logits.shape[-1]
    noise = []
    for n, seed in zip(rows_per_example.tolist(), seeds.tolist()):
        g = torch.Generator(device=device).manual_seed(seed)
        noise.append(torch.rand((n, vocab), generator=g, device=device))
    u = torch.cat(noise).clamp_(min=torch.finfo(torch.float32).tiny)  # -log(-log(0)) would be -inf
    return (logits.detach().float() - torch.log(-torch.log(u))).argmax(-1)


class ReplacedTokenDetection(Objective):
    name = "rtd"
    architectures = ("electra",)
    auto_class = "AutoModelForPreTraining"
    loss_weights = {"mlm": 1.0, "rtd": 50.0}  # the instance's come from objective.discriminator_weight
    replacement_defaults = (0.85, 0.0)
    two_segments = True
    usage = _USAGE

    def __init__(self, model, args, generator=None, tokenizer=None, size: str | None = None):
        super().__init__(model, args)  # self.model: the discriminator
        if not hasattr(model, "discriminator_predictions"):
            raise ToolkitError(
                f"objective 'rtd' trains an ELECTRA discriminator (ElectraForPreTraining), got {type(model).__name__}: "
                "start from scratch with model.architecture=electra, or from an ELECTRA discriminator folder"
            )
        self.size = size or electra_model(model.config)  # model.size; else read from the discriminator
        if generator is None:
            from transformers import AutoModelForMaskedLM

            from toolkit.models import ATTN_IMPLEMENTATION

            config = generator_config(model.config, generator_fraction(self.size, args))
            generator = AutoModelForMaskedLM.from_config(config, attn_implementation=ATTN_IMPLEMENTATION)
        if (generator.config.embedding_size, generator.config.vocab_size) != (
            model.config.embedding_size,
            model.config.vocab_size,
        ):
            raise ToolkitError(
                "the generator's embedding or vocabulary size differs from the discriminator's, so they cannot "
                "share embeddings: remove the generator folder to start a new generator"
            )
        self.generator = generator
        share_embeddings(self.generator, self.model)
        self.loss_weights = {"mlm": 1.0, "rtd": args.discriminator_weight}
        self.tokenizer = tokenizer  # written beside the generator too

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def check_recipe(cls, recipe) -> None:
        super().check_recipe(recipe)
        from toolkit.models import preset

        o, m = recipe.objective, recipe.model
        if o.generator_hidden_fraction is not None and not 0 < o.generator_hidden_fraction <= 1:
            raise ToolkitError(
                f"objective.generator_hidden_fraction={o.generator_hidden_fraction} must be in (0, 1] "
                "(ELECTRA: 1/4, 1/3 for ELECTRA-Base; the generator is narrower than the discriminator)"
            )
        if o.discriminator_weight <= 0:
            raise ToolkitError(
                f"objective.discriminator_weight={o.discriminator_weight} must be positive (ELECTRA: 50)"
            )
        if m.model_name_or_path is None:
            hidden = m.config_overrides.get("hidden_size", preset(m.architecture, m.size)[1])
            generator_shape(hidden, generator_fraction(m.size, o))

    @classmethod
    def from_recipe(cls, recipe, tokenizer):
        """A fresh pair from the size preset; or the discriminator in model.model_name_or_path and
        its `generator/` sub-folder when there is one (else a fresh generator)."""
        from transformers import AutoModelForMaskedLM

        from toolkit.models import ATTN_IMPLEMENTATION

        if tokenizer.mask_token_id is None:
            raise ToolkitError("objective 'rtd' needs a tokenizer with a [MASK] token: use tokenizer.kind=wordpiece")
        discriminator = cls.build_model(recipe, tokenizer)
        generator = None
        src = recipe.model.model_name_or_path
        if src and (Path(src) / "generator" / "config.json").is_file():
            generator = AutoModelForMaskedLM.from_pretrained(
                str(Path(src) / "generator"), attn_implementation=ATTN_IMPLEMENTATION
            )
        size = None if src else recipe.model.size  # a checkpoint's size is read from its config
        return cls(discriminator, recipe.objective, generator, tokenizer, size)

    def mask_probability(self) -> float:
        return mask_probability(self.size, self.args)

    def make_collator(self, tokenizer, seed: int, salt: str = "train"):
        return self.masking_collator(ReplacedTokenCollator, tokenizer, seed, salt)

    @classmethod
    def needs_word_starts(cls, args) -> bool:
        return args.whole_word_mask

    # ---- the step -----------------------------------------------------------------------------
    def counts(self, batch):
        mask = batch.get("attention_mask")
        tokens = mask.sum() if mask is not None else batch["input_ids"].new_tensor(batch["input_ids"].numel())
        return {"mlm": (batch["labels"] != -100).sum(), "rtd": tokens}

    def generate(self, batch):
        """The generator's logits at the masked positions, the discriminator's input (masked
        positions replaced by samples) and its labels (1 where that input differs from the original)."""
        ids, labels = batch["input_ids"], batch["labels"]
        selected = labels != -100
        logits = masked_lm_logits(
            self.generator, ids, labels, batch.get("token_type_ids"), attention_mask=batch.get("attention_mask")
        )
        sampled = gumbel_max(logits, selected.sum(1), batch["sample_seed"])
        corrupted = ids.clone()
        corrupted[selected] = sampled
        original = torch.where(selected, labels, ids)
        return logits, corrupted, corrupted != original

    def forward(self, batch):
        selected = batch["labels"] != -100
        gen_logits, corrupted, is_replaced = self.generate(batch)
        mlm_loss, mlm_correct = token_loss(gen_logits, batch["labels"][selected])

        mask = batch.get("attention_mask")
        weight = torch.ones_like(corrupted, dtype=torch.float32) if mask is None else mask.float()
        logits = self.model(
            input_ids=corrupted, attention_mask=mask, token_type_ids=batch.get("token_type_ids")
        ).logits.float()
        bce = F.binary_cross_entropy_with_logits(logits, is_replaced.float(), reduction="none")
        predicted = (logits.detach() > 0) & (weight > 0)
        replaced = is_replaced & (weight > 0)
        stats = {
            "mlm_correct": mlm_correct,
            "rtd_correct": ((predicted == is_replaced).float() * weight).sum(),
            "rtd_predicted": predicted.sum(),
            "rtd_replaced": replaced.sum(),
            "rtd_true_positive": (predicted & replaced).sum(),
        }
        return {"mlm": mlm_loss, "rtd": (bce * weight).sum()}, stats

    def metrics(self, totals):
        out = super().metrics(totals)
        masked, tokens = max(totals.get("count/mlm", 0.0), 1.0), max(totals.get("count/rtd", 0.0), 1.0)
        tp = totals.get("rtd_true_positive", 0.0)
        out["generator_perplexity"] = perplexity(totals.get("loss/mlm", 0.0) / masked)
        out["generator_accuracy"] = totals.get("mlm_correct", 0.0) / masked
        out["discriminator_accuracy"] = totals.get("rtd_correct", 0.0) / tokens
        out["replaced_precision"] = tp / max(totals.get("rtd_predicted", 0.0), 1.0)
        out["replaced_recall"] = tp / max(totals.get("rtd_replaced", 0.0), 1.0)
        out["replaced_share"] = totals.get("rtd_replaced", 0.0) / tokens
        return out

    # ---- outputs ------------------------------------------------------------------------------
    def save_pretrained(self, output_dir, state_dict: dict | None = None) -> None:
        """Discriminator at `output_dir`, generator (with the tokenizer) at `output_dir/generator`."""
        output_dir = Path(output_dir)
        discriminator = strip_prefix(state_dict, "model.")
        generator = strip_prefix(state_dict, "generator.")
        if generator is not None:  # a gathered (e.g. ZeRO-3) state dict may name shared tensors once
            for key, value in discriminator.items():
                if key.startswith("electra.embeddings."):
                    generator.setdefault(key, value)
        self.model.save_pretrained(output_dir, state_dict=discriminator)
        self.generator.save_pretrained(output_dir / "generator", state_dict=generator)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(output_dir / "generator"))

    def hf_models(self):
        return {"": self.model, "generator": self.generator}
