"""Token classification (NER, part-of-speech, chunking): one tag per word.

Input: CoNLL-style column files (a word and its tags per line, a blank line between sentences,
`-DOCSTART-` lines skipped) or tables with a list of words and a list of tags per row (the Hugging
Face `tokens` / `ner_tags` layout, tag names or ClassLabel ids). Each word's tag goes on its first
sub-word (or on all of them with `task.label_all_tokens`), -100 elsewhere. A sentence with more
pieces than `task.max_seq_length` is split at word boundaries into consecutive windows, so no word
is lost; predictions are read from each word's first sub-word and joined back, one tag per word.
Metrics: token (word) accuracy, and entity precision/recall/F1 by `seqeval` for IOB/IOB2/BIOES tags.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F

from toolkit.data.examples import LengthOrdered, Passthrough
from toolkit.errors import ToolkitError
from toolkit.finetuning.features import token_dataset
from toolkit.finetuning.heads import token_head_logits
from toolkit.finetuning.types.base import TaskType, TypeData, pad_rows
from toolkit.objectives.base import Objective

CONLL_SUFFIXES = (".conll", ".conll03", ".iob", ".bio", ".bioes")
IOB_TAG = re.compile(r"^(O|[BIESLU]-.+)$")
FEATURE_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")


def is_conll(path: Path, file_format: str | None) -> bool:
    return file_format == "conll" or path.suffix.lower() in CONLL_SUFFIXES


def read_conll(path: Path, tag_column: int = -1) -> dict:
    """{'tokens': [[word, ...], ...], 'tags': [[tag, ...], ...]} of a CoNLL column file."""
    tokens, tags, words, labels = [], [], [], []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            cols = line.split()
            if not cols or cols[0] == "-DOCSTART-":
                if words:
                    tokens.append(words)
                    tags.append(labels)
                    words, labels = [], []
                continue
            if len(cols) < 2:
                raise ToolkitError(
                    f"line {number} of '{path}' has one column ({line.strip()!r}): a CoNLL file needs the word and "
                    "its tag on every line, separated by whitespace (with a blank line between sentences)"
                )
            try:
                labels.append(cols[tag_column])
            except IndexError:
                raise ToolkitError(
                    f"line {number} of '{path}' has {len(cols)} columns, so task.conll_tag_column={tag_column} "
                    "does not exist: set it to the tag's column"
                ) from None
            words.append(cols[0])
    if words:
        tokens.append(words)
        tags.append(labels)
    return {"tokens": tokens, "tags": tags}


def is_iob(tags) -> bool:
    return all(IOB_TAG.match(t) for t in tags)


class TokenClassification(TaskType):
    name = "token_classification"
    auto_class = "AutoModelForTokenClassification"
    pipeline_task = "token-classification"
    main_metric = "f1"
    text_fields = ("tokens",)

    # ---- data -----------------------------------------------------------------------------------
    def read(self, spec, task, what):
        import datasets

        from toolkit.finetuning.tasks import read_table
        from toolkit.paths import resolve_path

        path = Path(resolve_path(spec))
        if path.is_file() and is_conll(path, task.file_format):
            rows = read_conll(path, task.conll_tag_column)
            if not rows["tokens"]:
                raise ToolkitError(f"{what}: '{spec}' holds no sentences")
            return datasets.Dataset.from_dict(rows)
        table = read_table(spec, task.file_format, what)
        if hasattr(table, "keys"):
            return {k: self._columns(v, task, f"'{spec}' ({k})") for k, v in table.items()}
        return self._columns(table, task, f"'{spec}'")

    def read_builtin(self, builtin, task):
        return builtin.prepare(builtin.train_file)

    def _columns(self, ds, task, where: str):
        """The table's words and tags as `tokens` and `tags` (tag names, ClassLabel ids turned to names)."""
        import datasets

        from toolkit.finetuning.types.rules import TAG_COLUMNS

        field = task.tags_field or next((c for c in TAG_COLUMNS if c in ds.column_names), None)
        missing = [c for c in (task.tokens_field, field) if c is None or c not in ds.column_names]
        if missing:
            raise ToolkitError(
                f"{where} has no {'tags' if field is None else repr(missing[0])} column (columns: "
                f"{', '.join(ds.column_names)}): set task.tokens_field and task.tags_field"
            )
        feature = ds.features[field]
        inner = getattr(feature, "feature", None)
        if isinstance(feature, list):
            inner = feature[0]
        names = getattr(inner, "names", None)
        tokens = [[str(w) for w in ws] for ws in ds[task.tokens_field][:]]
        tags = [[names[t] if names else str(t) for t in ts] for ts in ds[field][:]]
        return datasets.Dataset.from_dict({"tokens": tokens, "tags": tags})

    def check(self, split, ds, task, where):
        for i, (ws, ts) in enumerate(zip(ds["tokens"][:], ds["tags"][:])):
            if len(ws) != len(ts):
                raise ToolkitError(
                    f"row {i} of {where} has {len(ws)} words but {len(ts)} tags: every word needs exactly one tag"
                )
        return ds.filter(lambda b: [len(ws) > 0 for ws in b["tokens"]], batched=True)

    def prepare(self, raw, task):
        seen = sorted({t for ts in raw["train"]["tags"][:] for t in ts}, key=lambda t: (t != "O", t[2:], t))
        for split, ds in raw.items():
            unseen = sorted({t for ts in ds["tags"][:] for t in ts} - set(seen))
            if unseen:
                raise ToolkitError(
                    f"the {split} split has tags that training never saw: {', '.join(unseen[:5])}; correct the data"
                )
        from toolkit.finetuning.types.rules import entity_metrics

        asked = entity_metrics(task)
        iob = is_iob(seen)
        if asked == "true" and not iob:
            bad = [t for t in seen if not IOB_TAG.match(t)][:5]
            raise ToolkitError(
                f"task.entity_metrics=true needs IOB, IOB2 or BIOES tags (O, B-X, I-X, E-X, S-X) but the data has "
                f"{', '.join(map(repr, bad))}: set task.entity_metrics=false (token accuracy) or convert the tags"
            )
        return {"labels": seen, "entity_metrics": iob and asked != "false"}

    def encode(self, ds, tokenizer, task, data: TypeData):
        return encode_words(
            ds["tokens"][:], ds["tags"][:] if "tags" in ds.column_names else None, tokenizer, task, data
        )

    # ---- model ----------------------------------------------------------------------------------
    def model_config(self, model_dir, data, tokenizer, overrides):
        config = super().model_config(model_dir, data, tokenizer, {})
        config.num_labels = len(data.labels)
        config.id2label = dict(enumerate(data.labels))
        config.label2id = {n: i for i, n in enumerate(data.labels)}
        from toolkit.models import apply_overrides

        apply_overrides(config, overrides)
        return config

    def objective(self, model, recipe, data, tokenizer):
        return TokenClassifier(model, recipe.finetune, tokenizer.pad_token_id, recipe.task.max_seq_length, data)

    def usage(self, path, adapter, base):
        if adapter:
            merge = ".merge_and_unload()" if adapter in ("lora", "qlora") else ""
            return (
                "from peft import AutoPeftModelForTokenClassification\nfrom transformers import AutoTokenizer, pipeline\n\n"
                f'model = AutoPeftModelForTokenClassification.from_pretrained("{path}"){merge}\n'
                f'tagger = pipeline("token-classification", model=model, tokenizer=AutoTokenizer.from_pretrained("{path}"))\n'
                'print(tagger("John Smith lives in Berlin"))'
            )
        return (
            "from transformers import AutoModelForTokenClassification, AutoTokenizer, pipeline\n\n"
            f'model = AutoModelForTokenClassification.from_pretrained("{path}")\n'
            f'tagger = pipeline("token-classification", model=model, tokenizer=AutoTokenizer.from_pretrained("{path}"))\n'
            'print(tagger("John Smith lives in Berlin"))'
        )

    # ---- outputs --------------------------------------------------------------------------------
    def write_predictions(self, folder, data, examples, objective):
        import json

        words, tags = data.raw["test"]["tokens"][:], data.raw["test"]["tags"][:]
        predicted = word_predictions(examples, len(words), data.labels)
        with (folder / "test_predictions.jsonl").open("w") as fh:
            for ws, ts, ps in zip(words, tags, predicted):
                fh.write(json.dumps({"tokens": ws, "tags": ts, "predictions": ps}) + "\n")

    def predict(self, model, tokenizer, recipe, table, batch_size):
        import datasets

        from toolkit.finetuning.config import TaskArgs
        from toolkit.finetuning.types.rules import TAG_COLUMNS

        task = TaskArgs(**{k: v for k, v in recipe.get("task", {}).items() if k in TaskArgs.__dataclass_fields__})
        config = model.config
        labels = [config.id2label[i] for i in range(config.num_labels)]
        data = TypeData(self.name, None, None, None, {}, labels, "")
        if "tags" in table.column_names and "tokens" in table.column_names:
            rows = table
        elif task.tokens_field in table.column_names and not (
            {task.tags_field, *TAG_COLUMNS} & set(table.column_names)
        ):  # words without tags: predict only
            rows = datasets.Dataset.from_dict(
                {"tokens": [[str(w) for w in ws] for ws in table[task.tokens_field][:]]}
            ).add_column("tags", [[] for _ in range(len(table))])
        else:
            rows = self._columns(table, task, "the file")
        has_tags = all(len(ts) == len(ws) for ws, ts in zip(rows["tokens"][:], rows["tags"][:])) and all(
            t in config.label2id for ts in rows["tags"][:] for t in ts
        )
        features = encode_words(rows["tokens"][:], rows["tags"][:] if has_tags else None, tokenizer, task, data)
        preds, word_labels, sentences = [], [], []
        with torch.no_grad():
            for start in range(0, len(features), batch_size):
                part = features[start : start + batch_size]
                width = max(len(x) for x in part["input_ids"])
                batch = {
                    c: pad_rows(part[c], width, tokenizer.pad_token_id if c == "input_ids" else 0)
                    for c in FEATURE_COLUMNS
                    if c in part
                }
                logits = model(**batch).logits[:, -width:]  # without P-tuning's virtual tokens
                starts = pad_rows(part["word_start"], width, 0).bool()
                preds.append(pad_rows(torch.where(starts, logits.argmax(-1), -100).tolist(), task.max_seq_length, -100))
                word_labels.append(pad_rows(part["word_labels"], task.max_seq_length, -100))
                sentences += part["sentence"]
        examples = {"pred": torch.cat(preds), "label": torch.cat(word_labels), "sentence": torch.tensor(sentences)}
        predicted = word_predictions(examples, len(rows), labels)
        records = []
        for ws, ps, original in zip(rows["tokens"][:], predicted, table.to_list()):
            records.append({**original, "tokens": ws, "predictions": ps})
        scores = tag_metrics(examples, labels, is_iob(labels)) if has_tags else {}
        return records, scores


def encode_words(words: list, tags: list | None, tokenizer, task, data: TypeData):
    """Sentences -> windows of whole words that fit max_seq_length, labelled on their sub-words."""
    import datasets

    label2id = {n: i for i, n in enumerate(data.labels)}
    inside = {i: label2id.get("I-" + n[2:], i) for n, i in label2id.items() if n.startswith("B-")}
    budget = task.max_seq_length - tokenizer.num_special_tokens_to_add(pair=False)
    try:
        pieces = tokenizer(words, is_split_into_words=True, add_special_tokens=False) if words else None
    except (ValueError, AssertionError) as e:  # byte-level BPE without add_prefix_space
        raise ToolkitError(
            f"the tokenizer cannot tokenize pre-split words ({str(e).splitlines()[0][:200]}): save it with "
            "add_prefix_space=True, or use a WordPiece/SentencePiece checkpoint for token classification"
        ) from None
    chunks, owners, firsts, cut = [], [], [], 0
    for s, ws in enumerate(words):
        counts = [0] * len(ws)
        for w in pieces.word_ids(s):
            if w is not None:
                counts[w] += 1
        start, used = 0, 0
        for w, n in enumerate(counts):
            n = max(min(n, budget), 1)  # a single word longer than a window keeps its first pieces
            if used + n > budget and w > start:
                chunks.append(ws[start:w])
                owners.append(s)
                firsts.append(start)
                start, used = w, 0
            used += n
            cut += counts[w] > budget
        chunks.append(ws[start:])
        owners.append(s)
        firsts.append(start)
    enc = tokenizer(chunks, is_split_into_words=True, truncation=True, max_length=task.max_seq_length)
    out = {c: enc[c] for c in FEATURE_COLUMNS if c in enc}
    out.update(labels=[], word_labels=[], word_start=[], sentence=owners, first_word=firsts)
    for i, (s, first) in enumerate(zip(owners, firsts)):
        previous, row, row_words, starts = None, [], [], []
        for w in enc.word_ids(i):
            start = w is not None and w != previous
            tag = -100
            if w is not None and tags is not None:
                tag = label2id[tags[s][first + w]]
                if not start:
                    tag = inside.get(tag, tag) if task.label_all_tokens else -100
            row.append(tag)
            row_words.append(tag if start else -100)
            starts.append(int(start))
            previous = w
        out["labels"].append(row)
        out["word_labels"].append(row_words)
        out["word_start"].append(starts)
    if cut:
        data.notes.append(f"{cut} words longer than a window keep only their first pieces")
    return datasets.Dataset.from_dict(out)


def word_predictions(examples: dict, sentences: int, labels: list[str]) -> list[list[str]]:
    """One tag per word, per sentence, from the windows' first-sub-word predictions (in window order)."""
    out: list[list[str]] = [[] for _ in range(sentences)]
    for pred, s in zip(examples["pred"].tolist(), examples["sentence"].tolist()):
        out[s] += [labels[p] for p in pred if p != -100]
    return out


def tag_metrics(examples: dict, labels: list[str], entity: bool) -> dict:
    """Word accuracy, and seqeval's entity precision/recall/F1 over whole sentences."""
    pred, gold = examples["pred"], examples["label"]
    keep = gold != -100
    out = {"token_accuracy": float((pred[keep] == gold[keep]).float().mean()) if keep.any() else 0.0}
    if not entity:
        return out
    from seqeval.metrics import f1_score, precision_score, recall_score
    from seqeval.scheme import IOBES

    truth: dict = {}
    guess: dict = {}
    for p, g, s in zip(pred.tolist(), gold.tolist(), examples["sentence"].tolist()):
        pairs = [(labels[b], labels[a]) for a, b in zip(p, g) if b != -100]
        truth.setdefault(s, []).extend(t for t, _ in pairs)
        guess.setdefault(s, []).extend(q for _, q in pairs)
    y_true, y_pred = list(truth.values()), list(guess.values())
    bioes = any(t[:2] in ("E-", "S-") for t in labels)
    kwargs = {"mode": "strict", "scheme": IOBES} if bioes else {}
    out.update(
        precision=precision_score(y_true, y_pred, zero_division=0, **kwargs),
        recall=recall_score(y_true, y_pred, zero_division=0, **kwargs),
        f1=f1_score(y_true, y_pred, zero_division=0, **kwargs),
    )
    return out


class TokenizedWindows(LengthOrdered):
    """Windows padded per batch; per-token labels, word starts and sentence ids come along."""

    def __init__(self, ds, pad_id: int, width: int, longest_first: bool):
        self.columns = [c for c in FEATURE_COLUMNS if c in ds.column_names]
        lengths = [len(x) for x in ds["input_ids"][:]]
        columns = [*self.columns, "labels", "word_labels", "word_start", "sentence"]
        super().__init__(ds, columns, lengths, longest_first)
        self.pad_id, self.width = pad_id, width

    def __getitems__(self, indices):
        indices, rows = self.rows(indices)
        n = max(len(x) for x in rows["input_ids"])
        batch = {c: pad_rows(rows[c], n, self.pad_id if c == "input_ids" else 0) for c in self.columns}
        batch["labels"] = pad_rows(rows["labels"], n, -100)
        batch["word_labels"] = pad_rows(rows["word_labels"], n, -100)
        batch["word_start"] = pad_rows(rows["word_start"], n, 0)
        batch["sentence"] = torch.tensor(rows["sentence"])
        batch["idx"] = torch.tensor(indices)
        return batch


class TokenClassifier(Objective):
    name = "token-classification"
    architectures = ()
    auto_class = "AutoModelForTokenClassification"
    loss_weights = {"task": 1.0}

    def __init__(self, model, args, pad_id: int, max_len: int, data: TypeData):
        super().__init__(model, args)
        self.pad_id, self.max_len = pad_id, max_len
        self.labels, self.entity = list(data.labels), bool(data.extra.get("entity_metrics"))

    def make_dataset(self, data, split="train"):
        """The windows (a tokenized split), or the frozen mode's cached features of them."""
        return token_dataset(data, lambda t: TokenizedWindows(t, self.pad_id, self.max_len, split != "train"))

    def make_collator(self, tokenizer, seed, salt="train"):
        return Passthrough()

    def describe_example(self, data):
        return f"windows of up to {self.max_len} tokens"

    def num_tokens(self, batch):
        return int(batch["attention_mask"].sum())

    def counts(self, batch):
        return {"task": (batch["labels"] != -100).sum()}

    def forward(self, batch):
        inputs = {k: batch[k] for k in FEATURE_COLUMNS if k in batch}
        if "features" in batch:  # the frozen mode: the head on the encoder's cached vectors
            logits = token_head_logits(self.model, batch["features"]).float()
        else:
            logits = self.model(**inputs).logits.float()
        logits = logits[:, -inputs["input_ids"].shape[1] :]  # P-tuning's virtual tokens come first: not words
        loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100, reduction="sum")
        pred = logits.detach().argmax(-1)
        words = batch["word_labels"] != -100
        stats = {"correct": (pred[words] == batch["word_labels"][words]).sum(), "words": words.sum()}
        if not self.training:
            width = self.max_len
            shown = torch.where(batch["word_start"].bool(), pred, -100)
            stats["example/pred"] = F.pad(shown, (0, width - shown.shape[1]), value=-100)
            stats["example/label"] = F.pad(batch["word_labels"], (0, width - shown.shape[1]), value=-100)
            stats["example/sentence"] = batch["sentence"]
        return {"task": loss}, stats

    def metrics(self, totals):
        out = super().metrics(totals)
        out["accuracy"] = totals.get("correct", 0.0) / max(totals.get("words", 0.0), 1.0)
        return out

    def example_metrics(self, examples):
        return tag_metrics(examples, self.labels, self.entity)
