"""Cloze prompts for causal LMs (GPT-style): label scoring by the likelihood of the label words.

`finetune.mode: cloze` on a checkpoint that is a causal LM (GPT-2, or the toolkit's `clm` pretraining)
renders the same `prompt.template` and `prompt.verbalizer` as for a masked LM, but the model cannot
look at a mask: the template is cut at `{mask}` (what follows it is not scored), and each label word
is scored by its log-likelihood after that prompt, ALL of its tokens:

    score(label) = mean over the label's words w of  sum_i log p(w_i | prompt, w_<i)
                   (prompt.length_normalize: the mean over w's tokens instead of the sum)

averaged over the templates (PET's ensemble). A word is tokenized as it appears after a space
(' great'), so the space before `{mask}` in the template is left to the word.

In-context demonstrations (`prompt.demonstrations: k`, GPT-3 style): k training examples, drawn once
by `training.seed` from the training split (never from validation or test), are rendered in the
template with their true label's first word at `{mask}`, joined by a blank line, before the query.
The same k serve every validation, test and `toolkit predict` example (they are saved in prompt.json);
a training example that is one of the k sees the next draw instead of itself. Truncation cuts only
texts (demonstrations' and the query's alike, longest first): templates and label words are kept.

Fine-tuning (`training.num_train_epochs > 0`) is cross-entropy over these label scores, of the whole
model (`prompt.tune: full`) or LoRA adapters (`prompt.tune: lora`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from toolkit.data.examples import LengthOrdered
from toolkit.errors import ToolkitError
from toolkit.finetuning.cloze import parse_template, templates_of, verbalizer_pieces
from toolkit.finetuning.objective import SequenceClassifier
from toolkit.hf import quiet_transformers

SEPARATOR = "\n\n"  # between in-context demonstrations and before the query


# ---- words and templates ----------------------------------------------------------------------------


def label_words(tokenizer, labels: list[str], verbalizer: dict) -> list[list[list[int]]]:
    """For each label (in id order) the token ids of each of its words (every piece, not only the first)."""
    out, owner = [], {}
    for label, words in zip(labels, verbalizer_pieces(tokenizer, labels, verbalizer)):
        for word, pieces in words:
            if owner.get(tuple(pieces), label) != label:
                raise ToolkitError(
                    f"prompt.verbalizer gives {owner[tuple(pieces)]!r} and {label!r} the same word {word!r}: "
                    "choose other words"
                )
            owner[tuple(pieces)] = label
        out.append([pieces for _, pieces in words])
    return out


def prepare(tokenizer, template: str, pair: bool) -> tuple[list, list]:
    """(parts before {mask}, parts after it) with literal text tokenized: [("ids", [...]) | ("field", name)].
    The space just before {mask} belongs to the label word (' great'), so it is dropped from the prompt."""
    parts = parse_template(template, pair)
    at = parts.index(("field", "mask"))
    before, after = parts[:at], parts[at + 1 :]
    if before and before[-1][0] == "literal":
        before[-1] = ("literal", before[-1][1].rstrip(" "))

    def tokenized(ps):
        return [
            ("ids", tokenizer(v, add_special_tokens=False)["input_ids"]) if k == "literal" else (k, v) for k, v in ps
        ]

    return tokenized([p for p in before if p != ("literal", "")]), tokenized(after)


def leading_specials(tokenizer) -> list[int]:
    """Special tokens the tokenizer puts before a text (none for GPT-2's)."""
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return probe[: probe.index(plain[0])] if plain and plain[0] in probe else []


def _fill(parts, texts: dict) -> list[int]:
    out = []
    for kind, value in parts:
        out += value if kind == "ids" else texts[value]
    return out


def render(tokenizer, prepared, query: dict, demos: list[tuple[dict, list[int]]], max_len: int, longest: int):
    """Prompt ids (demonstrations, then the query's template up to {mask}) of one example; `demos` are
    (texts, label word ids). Texts are cut, longest first, so that prompt + the longest label word fit."""
    before, after = prepared
    sep = tokenizer(SEPARATOR, add_special_tokens=False)["input_ids"]
    lead = leading_specials(tokenizer)
    fixed_demo = sum(len(v) for k, v in before + after if k == "ids") + len(sep)
    fixed = len(lead) + sum(len(v) for k, v in before if k == "ids") + longest
    fixed += sum(fixed_demo + len(word) for _, word in demos)
    budget = max_len - fixed
    if budget < 1:
        raise ToolkitError(
            f"the prompt (template, {len(demos)} demonstration(s) and label words) takes {fixed} of "
            f"task.max_seq_length={max_len} tokens and leaves no room for the text: raise task.max_seq_length, "
            "lower prompt.demonstrations or shorten the template"
        )
    kept = {(d, name): ids for d, (texts, _) in enumerate(demos) for name, ids in texts.items()}
    kept.update({("q", name): ids for name, ids in query.items()})
    while (excess := sum(map(len, kept.values())) - budget) > 0:
        key = max(kept, key=lambda k: len(kept[k]))
        kept[key] = kept[key][: max(len(kept[key]) - excess, len(kept[key]) // 2)]
    ids = list(lead)
    for d, (texts, word) in enumerate(demos):
        mine = {name: kept[(d, name)] for name in texts}
        ids += _fill(before, mine) + word + _fill(after, mine) + sep
    return ids + _fill(before, {name: kept[("q", name)] for name in query})


# ---- demonstrations ---------------------------------------------------------------------------------


def draw_demonstrations(n_train: int, k: int, seed: int) -> tuple[list[int], int | None]:
    """(k training row indices, a spare row) drawn by seed: the demonstrations of every example, the
    spare standing in for a training example that is itself one of the k."""
    if k == 0:
        return [], None
    if n_train < k + 1:
        raise ToolkitError(
            f"prompt.demonstrations={k} needs at least {k + 1} training examples (k, and one more for a "
            f"training example that is itself drawn), the training split has {n_train}: lower prompt.demonstrations"
        )
    order = np.random.default_rng(seed).permutation(n_train)[: k + 1].tolist()
    return order[:k], order[k]


# ---- encoding the task ------------------------------------------------------------------------------


def encode(ds, tokenizer, templates, text_fields, max_len, words, demos, spare=None, rows=None):
    """Adds `clm_ids` (one prompt per template). `demos`: the demonstrations, (texts, label id) each; in
    the training split `rows` are their training row indices and `spare` (texts, label id) stands in
    for the one an example would otherwise see of itself."""
    pair = len(text_fields) == 2
    prepared = [prepare(tokenizer, t, pair) for t in templates]
    names = ["text", "text_b"][: len(text_fields)]
    longest = max(len(w) for label in words for w in label)

    def tokenized(demo):
        texts, label = demo
        return {n: tokenizer(str(texts[n]), add_special_tokens=False)["input_ids"] for n in names}, words[label][0]

    demo_ids = [tokenized(d) for d in demos]
    spare_ids = tokenized(spare) if spare is not None else None
    rows = list(rows or [])

    def encode_batch(batch, indices):
        with quiet_transformers():  # whole texts, cut by render(): not the "longer than" warning
            tokens = {
                n: tokenizer([str(x) for x in batch[c]], add_special_tokens=False)["input_ids"]
                for n, c in zip(names, text_fields)
            }
        out = []
        for r, i in enumerate(indices):
            mine = [spare_ids if j < len(rows) and rows[j] == i else d for j, d in enumerate(demo_ids)]
            query = {n: tokens[n][r] for n in names}
            out.append([render(tokenizer, p, query, mine, max_len, longest) for p in prepared])
        return {"clm_ids": out}

    from toolkit.data.blocks import hash_key, tokenizer_hash

    key = [ds._fingerprint, tokenizer_hash(tokenizer), templates, text_fields, max_len, words, demos, spare, rows]
    return ds.map(
        encode_batch,
        batched=True,
        with_indices=True,
        keep_in_memory=True,
        load_from_cache_file=False,
        new_fingerprint=hash_key([*key, "clm"]),
        desc="Rendering prompts",
    )


def encode_task(data, tokenizer, prompt, max_len: int, seed: int) -> dict:
    """Render every split in its templates (with the demonstrations); returns what prompt.json keeps."""
    if data.problem_type != "classification":
        raise ToolkitError("finetune.mode=cloze is for classification tasks: a verbalizer needs class labels")
    words = label_words(tokenizer, data.labels, prompt.verbalizer)
    chosen, spare_row = draw_demonstrations(len(data.train), prompt.demonstrations, seed)
    names = ["text", "text_b"][: len(data.text_fields)]

    def demo(r):
        row = data.train[r]
        return {n: row[c] for n, c in zip(names, data.text_fields)}, int(row["labels"])

    demos = [demo(r) for r in chosen]
    spare = demo(spare_row) if spare_row is not None else None
    for split, ds in data.splits().items():
        train = split == "train"
        encoded = encode(
            ds,
            tokenizer,
            templates_of(prompt),
            data.text_fields,
            max_len,
            words,
            demos,
            spare if train else None,
            chosen if train else None,
        )
        setattr(data, split, encoded)
    return {"words": words, "demonstrations": demos, "demonstration_rows": chosen}


# ---- scoring ----------------------------------------------------------------------------------------


class CausalExamples(LengthOrdered):
    """Each example's prompts (one per template), given as (batch, templates, length) with lengths."""

    def __init__(self, hf_dataset, longest_first: bool = False):
        lengths = [max(map(len, ids)) for ids in hf_dataset["clm_ids"][:]]
        super().__init__(hf_dataset, ["clm_ids", "labels"], lengths, longest_first)

    def __getitems__(self, indices: list[int]) -> dict:
        indices, rows = self.rows(indices)
        prompts = rows["clm_ids"]
        width = max(len(s) for ids in prompts for s in ids)
        ids = torch.zeros((len(indices), len(prompts[0]), width), dtype=torch.long)
        lengths = torch.zeros((len(indices), len(prompts[0])), dtype=torch.long)
        for r, per_template in enumerate(prompts):
            for t, seq in enumerate(per_template):
                ids[r, t, : len(seq)] = torch.tensor(seq)
                lengths[r, t] = len(seq)
        return {
            "prompt_ids": ids,
            "prompt_lengths": lengths,
            "attention_mask": (torch.arange(width) < lengths[..., None]).long(),
            "labels": torch.tensor(rows["labels"], dtype=torch.long),
            "idx": torch.tensor(indices, dtype=torch.long),
        }


def label_scores(model, words, prompt_ids, prompt_lengths, pad_id: int, normalize: bool) -> torch.Tensor:
    """(batch, labels): the log-likelihood of each label's words after each prompt (summed over the
    word's tokens, or averaged with `normalize`), averaged over a label's words and the templates.
    Every (prompt, word) pair is one right-padded sequence, so one forward pass scores them all."""
    b, t, _ = prompt_ids.shape
    flat = [w for label in words for w in label]
    owner = torch.tensor([i for i, label in enumerate(words) for _ in label])
    seqs, starts = [], []
    for r in range(b):
        for s in range(t):
            prompt = prompt_ids[r, s, : prompt_lengths[r, s]].tolist()
            for w in flat:
                seqs.append(prompt + w)
                starts.append(len(prompt))
    width = max(map(len, seqs))
    device = next(model.parameters()).device
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    target = torch.zeros_like(ids, dtype=torch.bool)  # positions holding a label word's token
    for i, (seq, start) in enumerate(zip(seqs, starts)):
        ids[i, : len(seq)] = torch.tensor(seq)
        attention[i, : len(seq)] = 1
        target[i, start : len(seq)] = True
    ids, attention, target = ids.to(device), attention.to(device), target.to(device)
    logits = model(input_ids=ids, attention_mask=attention).logits.float()
    # token j is predicted at position j - 1
    logp = F.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    hit = target[:, 1:]
    word_scores = (logp * hit).sum(-1)
    if normalize:
        word_scores = word_scores / hit.sum(-1)
    word_scores = word_scores.reshape(b, t, len(flat))
    per_label = torch.zeros(b, t, len(words), device=device).index_add(-1, owner.to(device), word_scores)
    per_label = per_label / torch.bincount(owner, minlength=len(words)).to(device)
    return per_label.mean(1)


class CausalClozeClassifier(SequenceClassifier):
    """Cross-entropy over the label words' log-likelihoods after the prompt (the engine's objective)."""

    name = "cloze-causal"
    auto_class = "AutoModelForCausalLM"

    def __init__(self, model, args, pad_id: int, words, normalize: bool, max_len: int = 0):
        super().__init__(model, args, "classification", pad_id, None, max_len)
        self.words, self.normalize = words, normalize

    def make_dataset(self, hf_dataset, split: str = "train"):
        return CausalExamples(hf_dataset, longest_first=split != "train")

    def describe_example(self, data) -> str:
        return f"prompts of up to {self.max_len} tokens, scored by {sum(map(len, self.words))} label words"

    def num_tokens(self, batch: dict) -> int:
        return int(batch["prompt_lengths"].sum())

    def flops(self, batch):
        # each (prompt, word) pair is its own sequence: count the prompt tokens once per word
        return super().flops({"input_ids": batch["prompt_ids"].flatten(0, 1)}) * sum(map(len, self.words))

    def logits(self, batch: dict) -> torch.Tensor:
        return label_scores(
            self.model, self.words, batch["prompt_ids"], batch["prompt_lengths"], self.pad_id, self.normalize
        )
