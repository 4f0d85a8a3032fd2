"""Cloze prompts for masked LMs (PET, Schick & Schuetze 2021; LM-BFF, Gao et al. 2021).

`finetune.mode: cloze` wraps each example in a template such as "{text} It was {mask}." and lets the
masked LM's own head answer at the mask: the score of a label is the MLM logit of its verbalizer word
there, and the loss is cross-entropy over the labels' scores. With `training.num_train_epochs: 0`
this is zero-shot prompting; with training it is prompt-based fine-tuning of the whole model
(`prompt.tune: full`, LM-BFF) or of LoRA adapters (`prompt.tune: lora`).

    template     literal text, {text} (and {text_b} for pairs) and exactly one {mask}
    verbalizer   label -> word, or a list of words (a label's score is the mean of its words' logits)
    words        a word is scored by its FIRST word piece (as it is tokenized after a space); with
                 prompt.single_token a word that splits into several pieces is an error instead
    truncation   only the text is cut (longest field first, from its end): the template's words and
                 the mask are always kept
    several      templates are all run and their label scores averaged (PET's ensemble), in training
                 and evaluation alike

The output is an ordinary `AutoModelForMaskedLM` folder (or a LoRA adapter on the base) plus
`prompt.json` (templates, verbalizer, labels and the verbalizer ids), which `toolkit predict` reads.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path

import torch

from toolkit.data.examples import LengthOrdered
from toolkit.errors import ToolkitError
from toolkit.finetuning.objective import SequenceClassifier
from toolkit.hf import quiet_transformers

PROMPT_FILE = "prompt.json"
FIELDS = ("text", "text_b", "mask")
# Prompts for the built-in tasks (LM-BFF's SST-2 template and words), used when prompt.* is unset.
DEFAULT_PROMPTS = {
    "movie-sentiment": (["{text} It was {mask}."], {"negative": "terrible", "positive": "great"}),
    "sms-spam": (["{text} This message is {mask}."], {"ham": "fine", "spam": "spam"}),
}


# ---- templates --------------------------------------------------------------------------------------


def parse_template(template: str, pair: bool) -> list[tuple[str, str]]:
    """A template -> [(kind, value)], kind "literal" (value: the text) or "field" (text, text_b, mask)."""
    if not isinstance(template, str) or not template.strip():
        raise ToolkitError(f"prompt.template must be a non-empty string, got {template!r}")
    parts: list[tuple[str, str]] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ToolkitError(
            f"prompt.template {template!r} is malformed ({e}): write fields as {{text}} and {{mask}}"
        ) from None
    for literal, name, spec, conversion in parsed:
        if literal:
            parts.append(("literal", literal))
        if name is None:
            continue
        if name not in FIELDS or spec or conversion:
            raise ToolkitError(
                f"prompt.template {template!r} has an unknown field {{{name}}}: use {{text}}, {{text_b}} and {{mask}}"
            )
        parts.append(("field", name))
    fields = [v for k, v in parts if k == "field"]
    if fields.count("mask") != 1:
        raise ToolkitError(
            f"prompt.template {template!r} must contain {{mask}} exactly once (it has {fields.count('mask')}): "
            "the model answers at the mask, e.g. '{text} It was {mask}.'"
        )
    if "text" not in fields:
        raise ToolkitError(f"prompt.template {template!r} has no {{text}}: put the example's text in it")
    if pair != ("text_b" in fields):
        need = "needs {text_b} for the second text" if pair else "has {text_b}, but the task has one text field"
        raise ToolkitError(f"prompt.template {template!r} {need}")
    return parts


def templates_of(prompt) -> list[str]:
    t = prompt.template
    return [t] if isinstance(t, str) else list(t or [])


def check_prompt(prompt, pair: bool) -> None:
    """Checks that need no tokenizer (called by the recipe's validate())."""
    templates = templates_of(prompt)
    if not templates:
        raise ToolkitError(
            "finetune.mode=cloze needs prompt.template, e.g. '{text} It was {mask}.' (a list averages several)"
        )
    for t in templates:
        parse_template(t, pair)
    if not isinstance(prompt.verbalizer, dict) or not prompt.verbalizer:
        raise ToolkitError(
            "finetune.mode=cloze needs prompt.verbalizer, a mapping of each label to its word(s), "
            "e.g. {negative: terrible, positive: great}"
        )
    for label, words in prompt.verbalizer.items():
        words = [words] if isinstance(words, str) else words
        if not isinstance(words, list) or not words or not all(isinstance(w, str) and w.strip() for w in words):
            raise ToolkitError(f"prompt.verbalizer.{label} must be a word or a list of words, got {words!r}")


# ---- verbalizer -------------------------------------------------------------------------------------


def word_pieces(tokenizer, word: str) -> list[int]:
    """A verbalizer word's token ids as the word appears inside a sentence (after a space: byte-level
    BPE gives 'Ġgreat', WordPiece drops the space)."""
    return tokenizer(" " + word.strip(), add_special_tokens=False)["input_ids"]


def verbalizer_pieces(tokenizer, labels: list[str], verbalizer: dict) -> list[list[tuple[str, list[int]]]]:
    """For each label (in id order) its words and their token ids: every label has a word, every word is
    one of the task's labels' and in the vocabulary (shared by masked-LM and causal-LM scoring)."""
    given = {str(k): ([v] if isinstance(v, str) else list(v)) for k, v in verbalizer.items()}
    missing = [n for n in labels if n not in given]
    if missing:
        raise ToolkitError(
            f"prompt.verbalizer has no word for label(s) {', '.join(map(repr, missing))}: give a word for each of "
            f"{', '.join(labels)}"
        )
    extra = sorted(set(given) - set(labels))
    if extra:
        raise ToolkitError(
            f"prompt.verbalizer names label(s) {', '.join(map(repr, extra))} that the task does not have "
            f"(its labels are {', '.join(labels)})"
        )
    out = []
    for label in labels:
        words = []
        for word in given[label]:
            pieces = word_pieces(tokenizer, word)
            if not pieces or (tokenizer.unk_token_id is not None and tokenizer.unk_token_id in pieces):
                raise ToolkitError(
                    f"prompt.verbalizer word {word!r} (label {label!r}) is not in the tokenizer's vocabulary: "
                    "choose another word"
                )
            words.append((word, pieces))
        out.append(words)
    return out


def verbalizer_ids(tokenizer, labels: list[str], verbalizer: dict, single_token: bool) -> list[list[int]]:
    """For each label (in id order) the token ids that score it: the first piece of each word."""
    ids, owner = [], {}
    for label, words in zip(labels, verbalizer_pieces(tokenizer, labels, verbalizer)):
        label_ids = []
        for word, pieces in words:
            if single_token and len(pieces) > 1:
                raise ToolkitError(
                    f"prompt.verbalizer word {word!r} (label {label!r}) is not a single token of the vocabulary "
                    f"(it splits into {tokenizer.convert_ids_to_tokens(pieces)}): choose a word the vocabulary "
                    "holds whole, or set prompt.single_token=false to score its first piece"
                )
            first = pieces[0]
            if owner.get(first, label) != label:
                raise ToolkitError(
                    f"prompt.verbalizer words of {owner[first]!r} and {label!r} begin with the same token "
                    f"{tokenizer.convert_ids_to_tokens(first)!r}, so they cannot be told apart: choose other words"
                )
            owner[first] = label
            label_ids.append(first)
        ids.append(label_ids)
    return ids


def label_matrix(ids: list[list[int]], vocab_size: int) -> torch.Tensor:
    """(labels, vocab) averaging matrix: label scores = mask logits @ matrix.T (a mean over its words)."""
    m = torch.zeros(len(ids), vocab_size)
    for label, words in enumerate(ids):
        m[label, words] = 1.0 / len(words)
    return m


# ---- rendering --------------------------------------------------------------------------------------


def prepare(tokenizer, template: str, pair: bool) -> list[tuple[str, object]]:
    """A parsed template with its literal text tokenized once: [("ids", [...]) | ("field", name)]."""
    return [
        ("ids", tokenizer(v, add_special_tokens=False)["input_ids"]) if k == "literal" else (k, v)
        for k, v in parse_template(template, pair)
    ]


def render(tokenizer, parts, texts: dict[str, list[int]], max_len: int) -> tuple[list[int], int]:
    """(input ids with special tokens, position of the mask) of one example in one prepared template;
    the texts (already tokenized) are cut, longest first, so that everything fits in max_len tokens."""
    lead, tail = specials(tokenizer)
    fixed = sum(len(v) for k, v in parts if k == "ids") + 1 + len(lead) + len(tail)
    budget = max_len - fixed
    if budget < 1:
        raise ToolkitError(
            f"the prompt template takes {fixed} of task.max_seq_length={max_len} tokens and leaves no room for the "
            "text: raise task.max_seq_length or shorten the template"
        )
    kept = dict(texts)
    while (excess := sum(map(len, kept.values())) - budget) > 0:
        longest = max(kept, key=lambda k: len(kept[k]))
        kept[longest] = kept[longest][: max(len(kept[longest]) - excess, len(kept[longest]) // 2)]
    body, mask_at = [], -1
    for kind, value in parts:
        if kind == "ids":
            body += value
        elif value == "mask":
            mask_at = len(body)
            body.append(tokenizer.mask_token_id)
        else:
            body += kept[value]
    return lead + body + tail, mask_at + len(lead)


def specials(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after one text ([CLS] ... [SEP], <s> ... </s>)."""
    probe = tokenizer(tokenizer.mask_token, add_special_tokens=True)["input_ids"]
    at = probe.index(tokenizer.mask_token_id)
    return probe[:at], probe[at + 1 :]


def check_tokenizer(tokenizer) -> None:
    if tokenizer.mask_token_id is None:
        raise ToolkitError(
            "finetune.mode=cloze needs a tokenizer with a mask token (a masked LM such as BERT or RoBERTa); this one "
            "has none: use a masked LM checkpoint"
        )


def encode(ds, tokenizer, templates: list[str], text_fields: list[str], max_len: int):
    """Adds `cloze_ids` (one token list per template) and `cloze_mask` (the mask position in each)."""
    pair = len(text_fields) == 2
    parsed = [prepare(tokenizer, t, pair) for t in templates]
    names = ["text", "text_b"][: len(text_fields)]

    def encode_batch(batch):
        with quiet_transformers():  # whole texts, cut by render(): not the "longer than" warning
            tokens = {
                n: tokenizer([str(x) for x in batch[c]], add_special_tokens=False)["input_ids"]
                for n, c in zip(names, text_fields)
            }
        ids, masks = [], []
        for r in range(len(batch[text_fields[0]])):
            rendered = [render(tokenizer, p, {n: tokens[n][r] for n in names}, max_len) for p in parsed]
            ids.append([x for x, _ in rendered])
            masks.append([m for _, m in rendered])
        return {"cloze_ids": ids, "cloze_mask": masks}

    from toolkit.data.blocks import hash_key, tokenizer_hash

    fingerprint = hash_key([ds._fingerprint, tokenizer_hash(tokenizer), templates, text_fields, max_len, "cloze"])
    return ds.map(
        encode_batch,
        batched=True,
        keep_in_memory=True,
        load_from_cache_file=False,
        new_fingerprint=fingerprint,
        desc="Rendering prompts",
    )


def encode_task(data, tokenizer, prompt, max_len: int) -> list[list[int]]:
    """Render every split of the task in its templates; returns the verbalizer ids (checked)."""
    check_tokenizer(tokenizer)
    if data.problem_type != "classification":
        raise ToolkitError("finetune.mode=cloze is for classification tasks: a verbalizer needs class labels")
    ids = verbalizer_ids(tokenizer, data.labels, prompt.verbalizer, prompt.single_token)
    for split, ds in data.splits().items():
        setattr(data, split, encode(ds, tokenizer, templates_of(prompt), data.text_fields, max_len))
    return ids


class ClozeExamples(LengthOrdered):
    """Rendered examples as (batch, templates, length) tensors, padded per batch."""

    def __init__(self, hf_dataset, pad_id: int, longest_first: bool = False):
        lengths = [max(map(len, ids)) for ids in hf_dataset["cloze_ids"][:]]
        super().__init__(hf_dataset, ["cloze_ids", "cloze_mask", "labels"], lengths, longest_first)
        self.pad_id = pad_id

    def __getitems__(self, indices: list[int]) -> dict:
        indices, rows = self.rows(indices)
        n_templates = len(rows["cloze_ids"][0])
        width = max(len(s) for ids in rows["cloze_ids"] for s in ids)
        input_ids = torch.full((len(indices), n_templates, width), self.pad_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for r, ids in enumerate(rows["cloze_ids"]):
            for t, seq in enumerate(ids):
                input_ids[r, t, : len(seq)] = torch.tensor(seq)
                attention[r, t, : len(seq)] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention,
            "mask_positions": torch.tensor(rows["cloze_mask"], dtype=torch.long),
            "labels": torch.tensor(rows["labels"], dtype=torch.long),
            "idx": torch.tensor(indices, dtype=torch.long),
        }


# ---- scoring ----------------------------------------------------------------------------------------


def mask_logits(model, input_ids, attention_mask, positions) -> torch.Tensor:
    """MLM logits over the vocabulary at one position per sequence. The LM head runs on those positions
    only (the vocabulary projection is most of a small MLM's cost) where the head's module is known."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    head = getattr(target, "cls", None) or getattr(target, "lm_head", None)  # BERT; RoBERTa
    if head is not None and hasattr(target, "base_model_prefix") and hasattr(target, target.base_model_prefix):
        encoder = getattr(target, target.base_model_prefix)
        hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return head(hidden[rows, positions][:, None])[:, 0]
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return logits[rows, positions]


def label_scores(model, matrix, input_ids, attention_mask, positions) -> torch.Tensor:
    """(batch, labels): each template's verbalizer scores at the mask, averaged over the templates."""
    b, t, n = input_ids.shape
    logits = mask_logits(model, input_ids.reshape(b * t, n), attention_mask.reshape(b * t, n), positions.reshape(-1))
    scores = logits.float() @ matrix.to(logits.device).T
    return scores.reshape(b, t, -1).mean(1)


class ClozeClassifier(SequenceClassifier):
    """Cross-entropy over the verbalizer words' logits at the mask (the engine's objective)."""

    name = "cloze"
    auto_class = "AutoModelForMaskedLM"

    def __init__(self, model, args, pad_id: int, ids: list[list[int]], vocab_size: int, max_len: int = 0):
        super().__init__(model, args, "classification", pad_id, None, max_len)
        self.register_buffer("verbalizer", label_matrix(ids, vocab_size), persistent=False)

    def make_dataset(self, hf_dataset, split: str = "train"):
        return ClozeExamples(hf_dataset, self.pad_id, longest_first=split != "train")

    def describe_example(self, data) -> str:
        n = len(data[0]["cloze_ids"]) if len(data) else 1
        return f"prompts of up to {self.max_len} tokens" + (f" in {n} templates" if n > 1 else "")

    def logits(self, batch: dict) -> torch.Tensor:
        return label_scores(
            self.model, self.verbalizer, batch["input_ids"], batch["attention_mask"], batch["mask_positions"]
        )


# ---- the model --------------------------------------------------------------------------------------


@dataclass
class ClozeModel:
    model: torch.nn.Module  # the masked LM, or the PeftModel around it
    base: torch.nn.Module
    trainable: int
    total: int
    new_weights: list


def load_lm(model_dir: str, config, causal: bool):
    """The checkpoint as a masked LM (or a causal LM) with its pretrained head; refused without one."""
    import transformers

    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModelForMaskedLM
    try:
        with quiet_transformers():
            model, info = auto.from_pretrained(model_dir, config=config, output_loading_info=True)
    except (ValueError, KeyError, OSError) as e:
        raise ToolkitError(
            f"a cloze prompt needs a masked LM or a causal LM, and '{model_dir}' does not load as one "
            f"({auto.__name__}): {str(e).splitlines()[0][:200]}"
        ) from None
    prefix = f"{model.base_model_prefix}."
    new_head = [k for k in info.get("missing_keys", []) if not k.startswith(prefix)]
    if new_head:
        raise ToolkitError(
            f"'{model_dir}' has no {'LM' if causal else 'MLM'} head (the checkpoint lacks "
            f"{', '.join(sorted(new_head)[:3])}): cloze prompts are answered by the pretrained head, so use a "
            "masked-LM or causal-LM checkpoint (e.g. the output_dir of toolkit pretrain with objective mlm or clm), "
            "or another finetune.mode"
        )
    return model


def build(recipe, model_dir: str, tokenizer, causal: bool = False):
    """The checkpoint as a masked LM with its pretrained head (refused without one), or as a causal LM
    (causal.py scores its label words), whole or with LoRA."""
    from toolkit.finetuning.modes import count_parameters
    from toolkit.models import load_config

    model = load_lm(model_dir, load_config(model_dir, recipe.model.config_overrides), causal)
    if recipe.prompt.tune == "lora":
        import peft

        f = recipe.finetune
        cfg = peft.LoraConfig(
            r=f.lora_r, lora_alpha=f.lora_alpha, lora_dropout=f.lora_dropout, target_modules=f.lora_target_modules
        )
        try:
            wrapped = peft.get_peft_model(model, cfg)
        except ValueError as e:
            raise ToolkitError(
                f"cannot set up LoRA on {type(model).__name__} ({e}): set finetune.lora_target_modules, e.g. "
                "[query, value]"
            ) from None
    else:
        for p in model.parameters():
            p.requires_grad = True
        wrapped = model
    trainable, total = count_parameters(wrapped)
    return ClozeModel(wrapped, model, trainable, total, [])


# ---- the saved prompt -------------------------------------------------------------------------------


def write_prompt(
    folder: Path, prompt, labels: list[str], ids, text_fields: list[str], max_len: int, causal: dict | None = None
):
    """prompt.json (see prompt_content)."""
    content = prompt_content(prompt, labels, ids, text_fields, max_len, causal)
    (folder / PROMPT_FILE).write_text(json.dumps(content, indent=2) + "\n")


def prompt_content(
    prompt, labels: list[str], ids, text_fields: list[str], max_len: int, causal: dict | None = None
) -> dict:
    """What prompt.json keeps; for a causal LM (`causal`: causal.encode_task's answer) the ids of every
    piece of each label word, the length normalisation and the demonstrations (texts and label ids)
    instead of verbalizer_ids."""
    content = {
        "templates": templates_of(prompt),
        "verbalizer": {str(k): v for k, v in prompt.verbalizer.items()},
        "labels": list(labels),
        "text_fields": list(text_fields),
        "max_seq_length": max_len,
    }
    if causal is None:
        content["verbalizer_ids"] = ids
    else:
        content.update(
            model="causal",
            label_word_ids=causal["words"],
            length_normalize=prompt.length_normalize,
            demonstrations=[{"texts": texts, "label": label} for texts, label in causal["demonstrations"]],
        )
    return content


def read_prompt(folder: Path) -> dict | None:
    path = Path(folder) / PROMPT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


USAGE = """import json, torch
from transformers import AutoModelForMaskedLM, AutoTokenizer{peft_import}

path = "{path}"
prompt = json.load(open(f"{{path}}/prompt.json"))
tokenizer = AutoTokenizer.from_pretrained(path)
{load}
text = prompt["templates"][0].format(text="{example}", mask=tokenizer.mask_token)
batch = tokenizer(text, return_tensors="pt")
at = batch["input_ids"][0].tolist().index(tokenizer.mask_token_id)
with torch.no_grad():
    logits = model(**batch).logits[0, at]
scores = torch.stack([logits[ids].mean() for ids in prompt["verbalizer_ids"]])
print(prompt["labels"][int(scores.argmax())])"""

LOAD_MODEL = "model = AutoModelForMaskedLM.from_pretrained(path).eval()"
LOAD_ADAPTER = """base = AutoModelForMaskedLM.from_pretrained(PeftConfig.from_pretrained(path).base_model_name_or_path)
model = PeftModel.from_pretrained(base, path).eval()"""


CAUSAL_USAGE = """# A causal LM scores each label's words after the prompt (see prompt.json). `toolkit predict {path} FILE.csv`
# does it all; below, the first template without prompt.json's demonstrations or length normalisation.
import json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer{peft_import}

path = "{path}"
prompt = json.load(open(f"{{path}}/prompt.json"))
tokenizer = AutoTokenizer.from_pretrained(path)
{load}
context = prompt["templates"][0].split("{{mask}}")[0].rstrip(" ").format(text="{example}")
ids = tokenizer(context, add_special_tokens=False)["input_ids"]

def loglik(word_ids):  # sum of log p(word token | context, earlier word tokens)
    seq = torch.tensor([ids + word_ids])
    with torch.no_grad():
        logp = model(seq).logits[0, :-1].log_softmax(-1)
    return sum(logp[len(ids) - 1 + i, t].item() for i, t in enumerate(word_ids))

scores = [sum(map(loglik, words)) / len(words) for words in prompt["label_word_ids"]]
print(prompt["labels"][max(range(len(scores)), key=scores.__getitem__)])"""


def _checkpoint_is_causal(recipe) -> bool:
    from toolkit.models import is_causal_lm, load_config
    from toolkit.paths import resolve_path

    try:
        return is_causal_lm(load_config(resolve_path(recipe.model.model_name_or_path), {}))
    except (OSError, ValueError, ToolkitError):
        return False


def usage(recipe, path: str, example: str) -> str:
    lora = recipe.prompt.tune == "lora"
    if _checkpoint_is_causal(recipe):
        load = LOAD_MODEL if not lora else LOAD_ADAPTER
        return CAUSAL_USAGE.format(
            path=path,
            example=example,
            peft_import="\nfrom peft import PeftConfig, PeftModel" if lora else "",
            load=load.replace("AutoModelForMaskedLM", "AutoModelForCausalLM"),
        )
    return USAGE.format(
        path=path,
        example=example,
        peft_import="\nfrom peft import PeftConfig, PeftModel" if lora else "",
        load=LOAD_ADAPTER if lora else LOAD_MODEL,
    )


def describe(recipe) -> str:
    p = recipe.prompt
    if recipe.training.num_train_epochs == 0 and recipe.training.max_steps <= 0:
        how = "zero-shot: no training"
    else:
        how = f"prompt-based fine-tuning, {'the whole model' if p.tune == 'full' else 'LoRA'}"
    if _checkpoint_is_causal(recipe):  # a causal LM: the label words' likelihood after the prompt
        how += "; label words scored by their log-likelihood after the prompt"
        how += " (mean per token)" if p.length_normalize else " (summed over their tokens)"
        how += f", {p.demonstrations} in-context demonstration(s)" if p.demonstrations else ""
    return f"cloze prompt ({how}; templates {templates_of(p)}, verbalizer {p.verbalizer})"
