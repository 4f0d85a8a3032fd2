"""Extractive question answering (reading comprehension): the answer is a span of the context.

Input: SQuAD v1.1 / v2.0 JSON (`data` -> `paragraphs` -> `qas`, `is_impossible` for v2.0), or flat
tables with `question`, `context` and `answers` ({"text": [...], "answer_start": [...]}, as a mapping,
a list of such mappings or a JSON string; empty for an unanswerable question). A long context is cut
into windows of `task.max_seq_length` tokens that overlap by `task.doc_stride`; each window is
labelled with the answer's start and end token, or with the [CLS] position when the answer is not
inside it. Predictions search the `n_best_size` best starts and ends of every window for the best
valid span (no longer than `max_answer_length`), map its token offsets back to the exact characters
of the context, and, when unanswerable questions exist (v2.0), answer nothing when the [CLS] score
beats the best span by more than `null_score_diff_threshold`. The windows and the span search live
in spans.py, which every output also ships as its `pipeline("question-answering")`. Metrics: exact
match and token F1 on the official SQuAD evaluation script's normalisation (0-100, as that script
reports them).
"""

from __future__ import annotations

import collections
import json
import re
import string
from pathlib import Path

import torch
import torch.nn.functional as F

from toolkit.data.examples import Passthrough
from toolkit.errors import ToolkitError
from toolkit.finetuning.features import token_dataset
from toolkit.finetuning.heads import token_head_logits
from toolkit.finetuning.types.base import TaskType, TypeData, pad_rows
from toolkit.finetuning.types.spans import (
    DEFAULTS,
    SETTINGS,
    best_answer,
    context_offsets,
    custom_pipeline_config,
    question_windows,
)
from toolkit.objectives.base import Objective

FEATURE_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")
NEG = -1e4  # logits of padding positions: never a candidate
PIPELINE_FILE = "toolkit_qa.py"  # spans.py, saved beside the model as its pipeline


# ---- the official SQuAD evaluation (v1.1 script; v2.0's handling of empty answers) ------------------


def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace (as the official script)."""

    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def f1_score(prediction: str, ground_truth: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(ground_truth).split()
    if not pred or not gold:  # no-answer (v2.0): 1 when both are empty, else 0
        return float(pred == gold)
    common = collections.Counter(pred) & collections.Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(gold)
    return 2 * precision * recall / (precision + recall)


def exact_match_score(prediction: str, ground_truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def squad_metrics(predictions: dict, references: dict) -> dict:
    """{'exact_match', 'f1'} in percent over every question: the best score over its gold answers."""
    em = f1 = 0.0
    for qid, golds in references.items():
        golds = [g for g in golds if normalize_answer(g)] or [""]
        pred = predictions.get(qid, "")
        em += max(exact_match_score(pred, g) for g in golds)
        f1 += max(f1_score(pred, g) for g in golds)
    n = max(len(references), 1)
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n}


# ---- reading ----------------------------------------------------------------------------------------


def is_squad_json(path: Path) -> bool:
    if path.suffix.lower() != ".json" or not path.is_file():
        return False
    with path.open(encoding="utf-8") as fh:
        head = fh.read(4096).lstrip()
    return head.startswith("{") and '"data"' in head and '"paragraphs"' in _whole(path, head)


def _whole(path: Path, head: str) -> str:
    return head if '"paragraphs"' in head else path.read_text(encoding="utf-8")


def read_squad(path: Path) -> dict:
    rows = {"id": [], "question": [], "context": [], "answers": []}
    for article in json.loads(path.read_text(encoding="utf-8"))["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                answers = [] if qa.get("is_impossible") else qa.get("answers", [])
                rows["id"].append(str(qa["id"]))
                rows["question"].append(qa["question"])
                rows["context"].append(paragraph["context"])
                rows["answers"].append(
                    {"text": [a["text"] for a in answers], "answer_start": [int(a["answer_start"]) for a in answers]}
                )
    return rows


def _answers(value, where: str, row: int) -> dict:
    if isinstance(value, str):
        value = json.loads(value) if value.strip() else {"text": [], "answer_start": []}
    if isinstance(value, list):
        value = {"text": [a["text"] for a in value], "answer_start": [a["answer_start"] for a in value]}
    if not isinstance(value, dict) or "text" not in value or "answer_start" not in value:
        raise ToolkitError(
            f"row {row} of {where}: answers must be {{'text': [...], 'answer_start': [...]}}, got {value!r:.100}"
        )
    text, start = value["text"], value["answer_start"]
    if isinstance(text, str):
        text, start = [text], [start]
    return {"text": [str(t) for t in text], "answer_start": [int(s) for s in start]}


class QuestionAnswering(TaskType):
    name = "question_answering"
    auto_class = "AutoModelForQuestionAnswering"
    pipeline_task = "question-answering"  # transformers 5 dropped it; each output ships its own (spans.py)
    main_metric = "f1"
    text_fields = ("question", "context")

    def read(self, spec, task, what):
        import datasets

        from toolkit.finetuning.tasks import read_table
        from toolkit.paths import resolve_path

        path = Path(resolve_path(spec))
        if is_squad_json(path):
            return datasets.Dataset.from_dict(read_squad(path))
        table = read_table(spec, task.file_format, what)
        if hasattr(table, "keys"):
            return {k: self.flat(v, f"'{spec}' ({k})") for k, v in table.items()}
        return self.flat(table, f"'{spec}'")

    def flat(self, ds, where: str):
        import datasets

        missing = [c for c in ("question", "context", "answers") if c not in ds.column_names]
        if missing:
            raise ToolkitError(
                f"{where} has no {', '.join(map(repr, missing))} column (columns: {', '.join(ds.column_names)}): "
                "question answering reads question, context and answers ({text, answer_start}), or SQuAD JSON"
            )
        ids = ds["id"][:] if "id" in ds.column_names else [str(i) for i in range(len(ds))]
        answers = [_answers(a, where, i) for i, a in enumerate(ds["answers"][:])]
        return datasets.Dataset.from_dict(
            {
                "id": [str(i) for i in ids],
                "question": [str(q) for q in ds["question"][:]],
                "context": [str(c) for c in ds["context"][:]],
                "answers": answers,
            }
        )

    def check(self, split, ds, task, where):
        from toolkit.finetuning.types.rules import check_doc_stride

        check_doc_stride(task)
        for i, (context, answers) in enumerate(zip(ds["context"][:], ds["answers"][:])):
            for text, start in zip(answers["text"], answers["answer_start"]):
                if context[start : start + len(text)] != text:
                    raise ToolkitError(
                        f"row {i} of {where}: the answer {text!r} does not start at answer_start={start} of its "
                        f"context (the context reads {context[start : start + len(text)]!r} there): answer_start must "
                        "be the character offset of the answer in the context"
                    )
        ids = ds["id"][:]
        if len(set(ids)) != len(ids):
            raise ToolkitError(f"{where} repeats question ids: every question needs its own id")
        return ds

    def prepare(self, raw, task):
        no_answer = any(not a["text"] for ds in raw.values() for a in ds["answers"][:])
        notes = ["unanswerable questions present (SQuAD v2.0 style)"] if no_answer else []
        return {"no_answer": no_answer, "notes": notes, "prompt_text": "Find the answer in the context:"}

    def encode(self, ds, tokenizer, task, data):
        return encode_questions(ds, tokenizer, task)

    def objective(self, model, recipe, data, tokenizer):
        return SpanExtractor(model, recipe.finetune, tokenizer.pad_token_id, recipe.task, data)

    def usage(self, path, adapter, base):
        if not adapter:
            return (
                "from transformers import pipeline\n\n"
                "# transformers 5 has no question-answering pipeline of its own: this folder ships the toolkit's\n"
                f"# ({PIPELINE_FILE}: windows over long contexts, n-best span search, no-answer)\n"
                f'qa = pipeline("question-answering", model="{path}", trust_remote_code=True)\n'
                'print(qa(question="Where does Anna live?", context="Anna lives in Oslo."))'
            )
        # Not merged: peft's question-answering forward drops token_type_ids (peft 0.21), so the adapter
        # trained without them, and a merged model, which reads them, would answer differently.
        return (
            "from peft import AutoPeftModelForQuestionAnswering\n"
            "from transformers import AutoConfig, AutoTokenizer\n"
            "from transformers.dynamic_module_utils import get_class_from_dynamic_module\n\n"
            f'model = AutoPeftModelForQuestionAnswering.from_pretrained("{path}").eval()  # as trained: not merged\n'
            "# transformers 5 has no question-answering pipeline of its own: this folder ships the toolkit's\n"
            f'QuestionAnswering = get_class_from_dynamic_module("{PIPELINE_FILE.removesuffix(".py")}.QuestionAnsweringPipeline", "{path}")\n'
            f'settings = AutoConfig.from_pretrained("{path}").{SETTINGS}  # windows and span search, as trained\n'
            f'qa = QuestionAnswering(model=model, tokenizer=AutoTokenizer.from_pretrained("{path}"), **settings)\n'
            'print(qa(question="Where does Anna live?", context="Anna lives in Oslo."))'
        )

    def write_files(self, folder, recipe, data):
        """spans.py as the output's question-answering pipeline (registered in config.json), with the
        span search's settings of this run."""
        import inspect
        import shutil

        shutil.copyfile(inspect.getsourcefile(best_answer), folder / PIPELINE_FILE)
        settings = {k: getattr(recipe.task, k) for k in DEFAULTS if k != "no_answer"}
        settings["no_answer"] = bool(data.extra.get("no_answer"))
        path = folder / "config.json"
        config = json.loads(path.read_text())
        config.update(custom_pipeline_config(PIPELINE_FILE.removesuffix(".py"), settings))
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    def write_predictions(self, folder, data, examples, objective):
        raw = data.raw["test"]
        answers = objective.answers(data.test, raw, examples)
        with (folder / "test_predictions.jsonl").open("w") as fh:
            for qid, q, a in zip(raw["id"][:], raw["question"][:], raw["answers"][:]):
                fh.write(
                    json.dumps({"id": qid, "question": q, "answers": a["text"], "prediction": answers[qid]}) + "\n"
                )

    def predict(self, model, tokenizer, recipe, table, batch_size):
        from toolkit.finetuning.config import TaskArgs

        task = TaskArgs(**{k: v for k, v in recipe.get("task", {}).items() if k in TaskArgs.__dataclass_fields__})
        labelled = "answers" in table.column_names
        if not labelled:
            table = table.add_column("answers", [{"text": [], "answer_start": []}] * len(table))
        raw = self.flat(table, "the file")
        features = encode_questions(raw, tokenizer, task)
        starts, ends = [], []
        with torch.no_grad():
            for at in range(0, len(features), batch_size):
                part = features[at : at + batch_size]
                width = max(len(x) for x in part["input_ids"])
                batch = {
                    c: pad_rows(part[c], width, tokenizer.pad_token_id if c == "input_ids" else 0)
                    for c in FEATURE_COLUMNS
                    if c in part
                }
                out = model(**batch)
                start, end = out.start_logits.float()[:, -width:], out.end_logits.float()[:, -width:]
                starts.append(F.pad(start, (0, task.max_seq_length - width), value=NEG))
                ends.append(F.pad(end, (0, task.max_seq_length - width), value=NEG))
        no_answer = bool(recipe.get("_facts", {}).get("no_answer", False))
        answers = postprocess(features, raw, torch.cat(starts), torch.cat(ends), task, no_answer)
        records = [{**row, "prediction": answers[qid]} for row, qid in zip(table.to_list(), raw["id"][:])]
        scores = {}
        if labelled:
            scores = squad_metrics(answers, {q: a["text"] for q, a in zip(raw["id"][:], raw["answers"][:])})
        return records, scores


def encode_questions(ds, tokenizer, task):
    """Questions and contexts -> overlapping windows labelled with the answer's token span."""
    import datasets

    if tokenizer.padding_side != "right":
        raise ToolkitError("question answering needs a tokenizer that pads on the right")
    enc = question_windows(tokenizer, ds["question"][:], ds["context"][:], task.max_seq_length, task.doc_stride)
    answers = ds["answers"][:]
    out = {c: enc[c] for c in FEATURE_COLUMNS if c in enc}
    out.update(start_positions=[], end_positions=[], example=[], offsets=[])
    for i, offsets in enumerate(enc["offset_mapping"]):
        e = enc["overflow_to_sample_mapping"][i]
        seq = enc.sequence_ids(i)
        start = end = 0  # [CLS]: the answer is not in this window (or there is none)
        if answers[e]["text"]:
            a_start = answers[e]["answer_start"][0]
            a_end = a_start + len(answers[e]["text"][0])
            inside = [k for k, s in enumerate(seq) if s == 1]
            if inside and offsets[inside[0]][0] <= a_start and offsets[inside[-1]][1] >= a_end:
                start = next(k for k in inside if offsets[k][1] > a_start)
                end = next(k for k in reversed(inside) if offsets[k][0] < a_end)
        out["start_positions"].append(start)
        out["end_positions"].append(end)
        out["example"].append(e)
        out["offsets"].append(context_offsets(enc, i))
    return datasets.Dataset.from_dict(out)


def postprocess(features, examples, start_logits, end_logits, task, no_answer: bool) -> dict:
    """Question id -> answer text: spans.best_answer over all of a question's windows ('' for no answer)."""
    by_example = collections.defaultdict(list)
    for f, e in enumerate(features["example"][:]):
        by_example[e].append(f)
    offsets_all = features["offsets"][:]
    start_logits, end_logits = start_logits.numpy(), end_logits.numpy()
    contexts, ids = examples["context"][:], examples["id"][:]
    answers = {}
    for e, qid in enumerate(ids):
        windows = [(start_logits[f], end_logits[f], offsets_all[f]) for f in by_example.get(e, [])]
        found = best_answer(
            windows, task.n_best_size, task.max_answer_length, no_answer, task.null_score_diff_threshold
        )
        answers[qid] = "" if found is None else contexts[e][found["start"] : found["end"]]
    return answers


class SpanWindows(torch.utils.data.Dataset):
    def __init__(self, ds, pad_id: int):
        self.columns = [c for c in FEATURE_COLUMNS if c in ds.column_names]
        self.ds = ds.select_columns([*self.columns, "start_positions", "end_positions"])
        self.pad_id = pad_id
        self._lengths = [len(x) for x in self.ds["input_ids"][:]]

    def __len__(self):
        return len(self.ds)

    def lengths(self):
        return self._lengths

    def __getitems__(self, indices):
        rows = self.ds[indices]
        n = max(len(x) for x in rows["input_ids"])
        batch = {c: pad_rows(rows[c], n, self.pad_id if c == "input_ids" else 0) for c in self.columns}
        batch["start_positions"] = torch.tensor(rows["start_positions"])
        batch["end_positions"] = torch.tensor(rows["end_positions"])
        batch["idx"] = torch.tensor(indices)
        return batch

    def __getitem__(self, i):
        return self.__getitems__([i])


class SpanExtractor(Objective):
    name = "question-answering"
    architectures = ()
    auto_class = "AutoModelForQuestionAnswering"
    loss_weights = {"task": 1.0}

    def __init__(self, model, args, pad_id: int, task, data: TypeData):
        super().__init__(model, args)
        self.pad_id, self.task, self.no_answer = pad_id, task, bool(data.extra.get("no_answer"))
        self.reference = (data.validation, data.raw.get("validation"))  # what evaluation scores against

    def make_dataset(self, data, split="train"):
        """The windows (a tokenized split), or the frozen mode's cached features of them."""
        return token_dataset(data, lambda t: SpanWindows(t, self.pad_id))

    def make_collator(self, tokenizer, seed, salt="train"):
        return Passthrough()

    def describe_example(self, data):
        return f"windows of up to {self.task.max_seq_length} tokens (stride {self.task.doc_stride})"

    def num_tokens(self, batch):
        return int(batch["attention_mask"].sum())

    def counts(self, batch):
        return {"task": batch["input_ids"].new_tensor(batch["input_ids"].shape[0])}

    def forward(self, batch):
        if "features" in batch:  # the frozen mode: the span head on the encoder's cached vectors
            start, end = token_head_logits(self.model, batch["features"]).float().unbind(-1)
        else:
            out = self.model(**{k: batch[k] for k in FEATURE_COLUMNS if k in batch})
            start, end = out.start_logits.float(), out.end_logits.float()
        n = batch["input_ids"].shape[1]  # P-tuning's virtual tokens come first: never an answer
        # Padding is never an answer either: without this mask the softmax would run over as many padding
        # positions as the batch's longest window adds, so the loss would depend on which windows share a
        # batch (and on the number of processes that split a global batch).
        padding = batch["attention_mask"] == 0
        start = start[:, -n:].masked_fill(padding, NEG)
        end = end[:, -n:].masked_fill(padding, NEG)
        loss = (
            F.cross_entropy(start, batch["start_positions"], reduction="sum")
            + F.cross_entropy(end, batch["end_positions"], reduction="sum")
        ) / 2
        stats = {}
        if not self.training:
            pad = self.task.max_seq_length - start.shape[1]
            stats["example/start"] = F.pad(start.detach(), (0, pad), value=NEG)
            stats["example/end"] = F.pad(end.detach(), (0, pad), value=NEG)
        return {"task": loss}, stats

    def answers(self, features, examples, gathered) -> dict:
        return postprocess(features, examples, gathered["start"], gathered["end"], self.task, self.no_answer)

    def example_metrics(self, examples):
        features, raw = self.reference
        if features is None or len(examples["start"]) != len(features):
            return {}
        answers = self.answers(features, raw, examples)
        return squad_metrics(answers, {q: a["text"] for q, a in zip(raw["id"][:], raw["answers"][:])})
