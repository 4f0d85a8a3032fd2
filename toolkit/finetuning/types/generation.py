"""Generative fine-tuning of a causal language model: text generation and dialogue.

Input: rows with `prompt` and `response` columns, or chat `messages` ([{role, content}, ...] whose
last message is the assistant's reply), rendered with the tokenizer's chat template (a plain
`role: content` template for tokenizers without one). The loss is on the response tokens only
(`task.train_on_prompt` for all). With `task.packing`, short examples share a row of
`max_seq_length` tokens without seeing each other: positions restart at 0 for every example and the
attention mask is block-diagonal (causal inside each example), so a packed row gives the same logits
as its examples alone. Evaluation reports the perplexity of the responses; the test split (and
`toolkit predict`) also generates a response for every prompt (greedy, beam or sampling) and scores it
against the reference: exact match and token F1 (SQuAD normalisation) and ROUGE-L (`rouge-score`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from toolkit.data.examples import Passthrough
from toolkit.errors import ToolkitError
from toolkit.finetuning.types.base import TaskType, TypeData
from toolkit.objectives.base import Objective

PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def render(example: dict, tokenizer) -> tuple[str, str | None]:
    """(prompt text, response text or None) of one example, in the form the model is trained on."""
    messages = example.get("messages")
    if messages:
        template = None if getattr(tokenizer, "chat_template", None) else PLAIN_TEMPLATE
        history, last = messages[:-1], messages[-1]
        if last["role"] != "assistant":
            history, last = messages, None
        prompt = tokenizer.apply_chat_template(
            history, tokenize=False, add_generation_prompt=True, chat_template=template
        )
        if last is None:
            return prompt, None
        full = tokenizer.apply_chat_template(messages, tokenize=False, chat_template=template)
        return prompt, full[len(prompt) :] if full.startswith(prompt) else last["content"]
    return f"{example['prompt']}\n", example.get("response")


def generation_metrics(predictions: list[str], references: list[str]) -> dict:
    from rouge_score import rouge_scorer

    from toolkit.finetuning.types.question_answering import exact_match_score, f1_score

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    n = max(len(references), 1)
    return {
        "exact_match": 100.0 * sum(exact_match_score(p, r) for p, r in zip(predictions, references)) / n,
        "f1": 100.0 * sum(f1_score(p, r) for p, r in zip(predictions, references)) / n,
        "rougeL": 100.0 * sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)) / n,
    }


class Generation(TaskType):
    name = "generation"
    auto_class = "AutoModelForCausalLM"
    pipeline_task = "text-generation"
    main_metric = "perplexity"
    text_fields = ("prompt", "response")

    def read(self, spec, task, what):
        from toolkit.finetuning.tasks import read_table

        table = read_table(spec, task.file_format, what)
        if hasattr(table, "keys"):
            return {k: self.rows(v, task, f"'{spec}' ({k})") for k, v in table.items()}
        return self.rows(table, task, f"'{spec}'")

    def rows(self, ds, task, where: str, need_response: bool = True):
        """The table as `prompt` + `response` columns, or a `messages` column."""
        import datasets

        cols = ds.column_names
        if task.messages_field in cols:
            out = []
            for i, messages in enumerate(ds[task.messages_field][:]):
                if not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
                    raise ToolkitError(f"row {i} of {where}: messages must be a list of {{role, content}} mappings")
                if need_response and (messages[-1]["role"] != "assistant" or not str(messages[-1]["content"]).strip()):
                    raise ToolkitError(
                        f"row {i} of {where} has no response: the last message must be the assistant's reply, with "
                        "text, to train on"
                    )
                out.append([{"role": str(m["role"]), "content": str(m["content"])} for m in messages])
            return datasets.Dataset.from_dict({"messages": out})
        if task.prompt_field not in cols or (need_response and task.response_field not in cols):
            raise ToolkitError(
                f"{where} has neither a {task.messages_field!r} column nor {task.prompt_field!r} and "
                f"{task.response_field!r} columns (columns: {', '.join(cols)}): set task.prompt_field and "
                "task.response_field, or task.messages_field"
            )
        prompts = ds[task.prompt_field][:]
        responses = ds[task.response_field][:] if task.response_field in cols else [None] * len(prompts)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            if p is None or need_response and (r is None or not str(r).strip()):
                raise ToolkitError(
                    f"row {i} of {where} has no {'prompt' if p is None else 'response'}: every training row needs "
                    "both; remove the row or fill it in"
                )
        return datasets.Dataset.from_dict(
            {"prompt": [str(p) for p in prompts], "response": [None if r is None else str(r) for r in responses]}
        )

    def read_builtin(self, builtin, task):
        from toolkit.finetuning.config import TaskArgs
        from toolkit.finetuning.tasks import read_table

        ds = builtin.prepare(read_table(builtin.train_file, builtin.file_format, f"task {task.name}"))
        return self.rows(ds, TaskArgs(), f"task {task.name}")

    def prepare(self, raw, task):
        return {"prompt_text": "Reply to the message:"}

    def encode(self, ds, tokenizer, task, data):
        return encode_examples(ds, tokenizer, task)

    def model_config(self, model_dir, data, tokenizer, overrides):
        config = super().model_config(model_dir, data, tokenizer, overrides)
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = tokenizer.pad_token_id
        return config

    def objective(self, model, recipe, data, tokenizer):
        return ResponseLM(model, recipe.finetune, tokenizer.pad_token_id, recipe.task)

    def usage(self, path, adapter, base):
        load = (
            f'from peft import AutoPeftModelForCausalLM\nmodel = AutoPeftModelForCausalLM.from_pretrained("{path}")\n'
            if adapter
            else f'model = AutoModelForCausalLM.from_pretrained("{path}")\n'
        )
        return (
            "from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline\n"
            + load
            + f'generate = pipeline("text-generation", model=model, tokenizer=AutoTokenizer.from_pretrained("{path}"))\n'
            'print(generate("how are you?\\n", max_new_tokens=32, return_full_text=False))'
            "  # prompts end with a newline, as trained"
        )

    def test_metrics(self, model, objective, data, recipe, tokenizer, examples):
        raw = data.raw["test"]
        predictions = generate_all(model, tokenizer, [dict(r) for r in raw], recipe.task)
        data.extra["test_generations"] = predictions
        references = [render(dict(r), tokenizer)[1] or "" for r in raw]
        references = [r.removesuffix(tokenizer.eos_token or "").strip() for r in references]
        return generation_metrics(predictions, references)

    def write_predictions(self, folder, data, examples, objective):
        import json

        generated = data.extra.get("test_generations") or []
        with (folder / "test_predictions.jsonl").open("w") as fh:
            for row, g in zip(data.raw["test"], generated):
                fh.write(json.dumps({**dict(row), "prediction": g}) + "\n")

    def predict(self, model, tokenizer, recipe, table, batch_size):
        from toolkit.finetuning.config import TaskArgs

        task = TaskArgs(**{k: v for k, v in recipe.get("task", {}).items() if k in TaskArgs.__dataclass_fields__})
        rows = self.rows(table, task, "the file", need_response=False)
        examples = [dict(r) for r in rows]
        predictions = generate_all(model, tokenizer, examples, task)
        records = [{**original, "prediction": p} for original, p in zip(table.to_list(), predictions)]
        references = [render(e, tokenizer)[1] for e in examples]
        scores = {}
        if all(r is not None for r in references):
            scores = generation_metrics(
                predictions, [r.removesuffix(tokenizer.eos_token or "").strip() for r in references]
            )
        return records, scores


def encode_examples(ds, tokenizer, task):
    """Examples -> input_ids and labels (-100 on the prompt unless train_on_prompt), at most
    max_seq_length tokens: a long prompt loses its oldest tokens first, then the response its end."""
    import datasets

    eos = tokenizer.eos_token_id
    out = {"input_ids": [], "labels": []}
    for row in ds:
        prompt, response = render(dict(row), tokenizer)
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(response or "", add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        r = r[: task.max_seq_length - 1]
        p = p[-(task.max_seq_length - len(r)) :] if len(p) + len(r) > task.max_seq_length else p
        out["input_ids"].append(p + r)
        out["labels"].append((p if task.train_on_prompt else [-100] * len(p)) + r)
    return datasets.Dataset.from_dict(out)


def generate_all(model, tokenizer, examples: list[dict], task) -> list[str]:
    """One generated response per example's prompt (one prompt at a time: no padding to get wrong)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = next(base.parameters()).device
    was_training = model.training
    model.eval()
    kwargs = {"max_new_tokens": task.max_new_tokens, "num_beams": task.num_beams, "do_sample": task.do_sample}
    if task.do_sample:
        kwargs.update(temperature=task.temperature, top_p=task.top_p)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    with torch.no_grad():
        for example in examples:
            prompt, _ = render(example, tokenizer)
            ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
            ids = (
                ids[:, -(task.max_seq_length - task.max_new_tokens) :]
                if task.max_seq_length > task.max_new_tokens
                else ids
            )
            new = model.generate(
                input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device), pad_token_id=pad, **kwargs
            )[0, ids.shape[1] :]
            out.append(tokenizer.decode(new, skip_special_tokens=True).strip())
    model.train(was_training)
    return out


class PaddedLM(torch.utils.data.Dataset):
    """One example per row, padded on the right to the batch's longest."""

    def __init__(self, ds, pad_id: int):
        self.ids, self.labels, self.pad_id = ds["input_ids"][:], ds["labels"][:], pad_id

    def __len__(self):
        return len(self.ids)

    def lengths(self):
        return [len(x) for x in self.ids]

    def __getitems__(self, indices):
        width = max(len(self.ids[i]) for i in indices)
        ids = torch.full((len(indices), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(indices), width), -100, dtype=torch.long)
        mask = torch.zeros((len(indices), width), dtype=torch.long)
        for r, i in enumerate(indices):
            n = len(self.ids[i])
            ids[r, :n], labels[r, :n], mask[r, :n] = torch.tensor(self.ids[i]), torch.tensor(self.labels[i]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask, "idx": torch.tensor(indices)}

    def __getitem__(self, i):
        return self.__getitems__([i])


def pack(lengths: list[int], width: int) -> list[list[int]]:
    """Examples (by index, in order) -> rows of at most `width` tokens (first fit in order)."""
    rows, current, used = [], [], 0
    for i, n in enumerate(lengths):
        if current and used + n > width:
            rows.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        rows.append(current)
    return rows


class PackedLM(torch.utils.data.Dataset):
    """Several examples per row; each attends only to itself (block-diagonal causal mask, positions
    from 0), and the first token of each example is never a target, as when it starts its own row."""

    def __init__(self, ds, pad_id: int, width: int):
        self.ids, self.labels, self.pad_id, self.width = ds["input_ids"][:], ds["labels"][:], pad_id, width
        self.rows = pack([len(x) for x in self.ids], width)

    def __len__(self):
        return len(self.rows)

    def lengths(self):
        return [sum(len(self.ids[i]) for i in row) for row in self.rows]

    def __getitems__(self, indices):
        width = max(self.lengths()[r] for r in indices) if len(indices) < 8 else self.width
        n = len(indices)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        labels = torch.full((n, width), -100, dtype=torch.long)
        positions = torch.zeros((n, width), dtype=torch.long)
        segment = torch.full((n, width), -1, dtype=torch.long)
        for r, row in enumerate(indices):
            at = 0
            for s, i in enumerate(self.rows[row]):
                k = len(self.ids[i])
                ids[r, at : at + k] = torch.tensor(self.ids[i])
                labels[r, at : at + k] = torch.tensor(self.labels[i])
                labels[r, at] = -100
                positions[r, at : at + k] = torch.arange(k)
                segment[r, at : at + k] = s
                at += k
            positions[r, at:] = torch.arange(width - at)  # padding: its own segment, never a target
        causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
        mask = (segment[:, :, None] == segment[:, None, :]) & causal
        return {
            "input_ids": ids,
            "labels": labels,
            "position_ids": positions,
            "attention_mask": mask[:, None],
            "num_real": (segment >= 0).sum(),
            "idx": torch.tensor(indices),
        }

    def __getitem__(self, i):
        return self.__getitems__([i])


class ResponseLM(Objective):
    name = "generation"
    architectures = ()
    auto_class = "AutoModelForCausalLM"
    loss_weights = {"task": 1.0}

    def __init__(self, model, args, pad_id: int, task):
        super().__init__(model, args)
        self.pad_id, self.task = pad_id, task

    def make_dataset(self, hf_dataset, split="train"):
        if self.task.packing and split == "train":
            return PackedLM(hf_dataset, self.pad_id, self.task.max_seq_length)
        return PaddedLM(hf_dataset, self.pad_id)

    def make_collator(self, tokenizer, seed, salt="train"):
        return Passthrough()

    def describe_example(self, data):
        return (
            "packed rows" if isinstance(data, PackedLM) else "examples"
        ) + f" of up to {self.task.max_seq_length} tokens"

    def num_tokens(self, batch):
        return int(batch["num_real"]) if "num_real" in batch else int(batch["attention_mask"].sum())

    def counts(self, batch):
        return {"task": (batch["labels"][:, 1:] != -100).sum()}

    def logits(self, batch):
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        return self.model(**inputs).logits

    def forward(self, batch):
        logits = self.logits(batch).float()
        loss = F.cross_entropy(
            logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100, reduction="sum"
        )
        return {"task": loss}, {}

    def metrics(self, totals):
        out = super().metrics(totals)
        out["perplexity"] = math.exp(out["loss"]) if out["loss"] < 50 else float("inf")
        return out


def check_packing_support(model) -> None:
    """Packing hands the model a 4-D attention mask; PEFT prompt tuning cannot extend one."""
    if hasattr(model, "peft_config") and any(c.is_prompt_learning for c in model.peft_config.values()):
        raise ToolkitError("task.packing cannot be used with prompt tuning: set task.packing=false")


__all__ = ["Generation", "TypeData", "render", "generation_metrics", "PackedLM", "PaddedLM", "ResponseLM", "pack"]
