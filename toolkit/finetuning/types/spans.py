"""Extractive QA's windows and span search, and the transformers pipeline that runs them.

Training, `toolkit predict` and the saved model's pipeline read a question and its context the same
way: `question_windows` cuts the context into windows of `max_seq_length` tokens overlapping by
`doc_stride` (the question whole in each), `context_offsets` keeps each window's character offsets of
context tokens, and `best_answer` searches the `n_best_size` best starts and ends of every window for
the best valid span (start <= end, at most `max_answer_length` tokens), answering nothing when
unanswerable questions were trained on and the [CLS] score beats that span by more than
`null_score_diff_threshold`.

transformers 5 removed `pipeline("question-answering")`. This file is saved beside every
question-answering output as `toolkit_qa.py` and named in its config.json's `custom_pipelines`, so
`pipeline("question-answering", model=folder, trust_remote_code=True)` answers with this same code,
without the toolkit. It therefore imports only numpy, torch and transformers.
"""

from __future__ import annotations

import numpy as np

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
SETTINGS = "question_answering"  # the config.json entry with the span search's settings (pipeline defaults)
DEFAULTS = {  # the recipe's defaults (task.*), for a config without the entry
    "max_seq_length": 128,
    "doc_stride": 32,
    "n_best_size": 20,
    "max_answer_length": 30,
    "null_score_diff_threshold": 0.0,
    "no_answer": False,
}
WINDOW_SETTINGS = ("max_seq_length", "doc_stride")  # read when the windows are cut; the rest by the search


def question_windows(tokenizer, questions: list[str], contexts: list[str], max_seq_length: int, doc_stride: int):
    """The tokenizer's windows of every (question, context) pair, with offsets and the pair each came from."""
    return tokenizer(
        [q.lstrip() for q in questions],
        contexts,
        truncation="only_second",
        max_length=max_seq_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )


def context_offsets(encoding, i: int) -> list[list[int]]:
    """Character offsets of window i's context tokens; [-1, -1] for the question and special tokens."""
    seq = encoding.sequence_ids(i)
    return [list(o) if seq[k] == 1 else [-1, -1] for k, o in enumerate(encoding["offset_mapping"][i])]


def best_answer(
    windows, n_best_size: int, max_answer_length: int, no_answer: bool = False, null_score_diff_threshold: float = 0.0
) -> dict | None:
    """The best span over a question's windows, each (start logits, end logits, context offsets) with the
    logits of at least len(offsets) positions: {'start', 'end' (characters), 'window', 'tokens', 'score'},
    or None for no answer (no valid span, or the no-answer score wins)."""
    best, best_score, null_score = None, -np.inf, np.inf
    for w, (s_log, e_log, offsets) in enumerate(windows):
        null_score = min(null_score, s_log[0] + e_log[0])
        n = len(offsets)
        starts = np.argsort(s_log[:n])[::-1][:n_best_size]
        ends = np.argsort(e_log[:n])[::-1][:n_best_size]
        for s in starts:
            for t in ends:
                if offsets[s][0] < 0 or offsets[t][0] < 0 or t < s or t - s + 1 > max_answer_length:
                    continue
                score = s_log[s] + e_log[t]
                if score > best_score:
                    best_score = score
                    best = {"start": offsets[s][0], "end": offsets[t][1], "window": w, "tokens": (int(s), int(t))}
    if best is None or no_answer and null_score - best_score > null_score_diff_threshold:
        return None
    return {**best, "score": float(best_score)}


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _pipeline_class():
    import transformers

    class QuestionAnsweringPipeline(transformers.Pipeline):
        """`qa(question=..., context=...)` -> {'answer', 'score', 'start', 'end'}: the toolkit's windows and
        span search; the score is the span's start x end probability in its window (of [CLS] when there is
        no answer). Settings (max_seq_length, doc_stride, n_best_size, max_answer_length,
        null_score_diff_threshold, no_answer) default to the model's config and can be passed per call."""

        def __call__(self, question=None, context=None, **kwargs):
            if isinstance(question, dict) or (
                isinstance(question, list) and question and isinstance(question[0], dict)
            ):
                return super().__call__(question, **kwargs)
            if question is None or context is None:
                raise ValueError("give question= and context= (strings, or lists of strings of equal length)")
            if isinstance(question, str):
                return super().__call__({"question": question, "context": context}, **kwargs)
            pairs = zip(question, context, strict=True)
            return super().__call__([{"question": q, "context": c} for q, c in pairs], **kwargs)

        def _sanitize_parameters(self, **kwargs):  # only what the caller gave (transformers' convention)
            unknown = sorted(set(kwargs) - set(DEFAULTS))
            if unknown:
                raise TypeError(f"unknown question-answering settings: {', '.join(unknown)}")
            pre = {k: kwargs[k] for k in WINDOW_SETTINGS if k in kwargs}
            return pre, {}, {k: v for k, v in kwargs.items() if k not in WINDOW_SETTINGS}

        def settings(self, given: dict) -> dict:
            """The settings: the toolkit's defaults < the model's config < those given."""
            return {**DEFAULTS, **(getattr(self.model.config, SETTINGS, None) or {}), **given}

        def preprocess(self, inputs, **given):
            s = self.settings(given)
            enc = question_windows(
                self.tokenizer, [inputs["question"]], [inputs["context"]], s["max_seq_length"], s["doc_stride"]
            )
            columns = {k: enc[k] for k in MODEL_INPUTS if k in enc}
            tensors = self.tokenizer.pad(columns, padding=True, return_tensors="pt")
            offsets = [context_offsets(enc, i) for i in range(len(enc["input_ids"]))]
            return {"inputs": dict(tensors), "offsets": offsets, "context": inputs["context"]}

        def _forward(self, model_inputs):
            out = self.model(**model_inputs["inputs"])
            width = model_inputs["inputs"]["input_ids"].shape[1]  # P-tuning's virtual tokens come first
            return {
                "start": out.start_logits[:, -width:].float(),
                "end": out.end_logits[:, -width:].float(),
                "offsets": model_inputs["offsets"],
                "context": model_inputs["context"],
            }

        def postprocess(self, outputs, **given):
            s = self.settings(given)
            start, end = outputs["start"].numpy(), outputs["end"].numpy()
            windows = [(start[w], end[w], offsets) for w, offsets in enumerate(outputs["offsets"])]
            found = best_answer(
                windows, s["n_best_size"], s["max_answer_length"], s["no_answer"], s["null_score_diff_threshold"]
            )
            if found is None:
                w = int(np.argmin([a[0] + b[0] for a, b, _ in windows]))  # the window of the no-answer score
                n = len(windows[w][2])
                score = _softmax(start[w][:n])[0] * _softmax(end[w][:n])[0]
                return {"answer": "", "score": float(score), "start": 0, "end": 0}
            w, (i, j), n = found["window"], found["tokens"], len(windows[found["window"]][2])
            score = _softmax(start[w][:n])[i] * _softmax(end[w][:n])[j]
            text = outputs["context"][found["start"] : found["end"]]
            return {"answer": text, "score": float(score), "start": found["start"], "end": found["end"]}

    return QuestionAnsweringPipeline


_PIPELINE: list = []


def __getattr__(name: str):
    """`QuestionAnsweringPipeline`, built on first access (importing transformers' pipelines takes seconds,
    which the toolkit's own span search does not need)."""
    if name == "QuestionAnsweringPipeline":
        if not _PIPELINE:
            _PIPELINE.append(_pipeline_class())
        return _PIPELINE[0]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def custom_pipeline_config(module: str, settings: dict) -> dict:
    """The config.json entries that register the pipeline (saved as `module`.py) and its settings."""
    return {
        "custom_pipelines": {
            "question-answering": {
                "impl": f"{module}.QuestionAnsweringPipeline",
                "pt": ["AutoModelForQuestionAnswering"],
                "type": "text",
            }
        },
        SETTINGS: {k: settings[k] for k in DEFAULTS},
    }
