"""Prefix tuning (P-tuning v2) adapters give the same predictions inside the toolkit as when loaded by
stock PEFT: the reference below runs what PEFT's own prefix path runs (the adapter's prompt as a
cache in front of the tokens, transformers' own positions after it) with no toolkit code."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import torch
from conftest import labelled_sentence

import toolkit


def test_prefix_adapter_predictions_equal_stock_peft(tmp_path, wordpiece_dir):
    from peft import PeftConfig, PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForMaskedLM

    from toolkit.finetuning.predict import predict

    tokenizer = AutoTokenizer.from_pretrained(wordpiece_dir)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        pad_token_id=tokenizer.pad_token_id,
    )
    BertForMaskedLM(config).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    rng = random.Random(0)
    rows = [(labelled_sentence(rng, i % 2), "pos" if i % 2 else "neg") for i in range(32)]
    data = tmp_path / "data.csv"
    with data.open("w", newline="") as fh:
        csv.writer(fh).writerows([("text", "label"), *rows])

    result = toolkit.finetune(
        {
            "output_dir": str(tmp_path / "out"),
            "model": {"model_name_or_path": str(tmp_path / "base")},
            "task": {"train_file": str(data), "max_seq_length": 24},
            "finetune": {"mode": "prefix", "num_virtual_tokens": 4},
            "training": {"num_train_epochs": 1, "per_device_train_batch_size": 8},
        }
    )
    out = Path(result.output_dir)

    # stock: the recorded base, the saved classification config, PeftModel.from_pretrained; then PEFT's
    # prefix path by hand (its signature check refuses transformers 5 models before it gets there)
    base = AutoModelForSequenceClassification.from_pretrained(
        PeftConfig.from_pretrained(out).base_model_name_or_path, config=AutoConfig.from_pretrained(out)
    )
    stock = PeftModel.from_pretrained(base, out).eval()
    texts = [t for t, _ in rows]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    n = stock.peft_config["default"].num_virtual_tokens
    with torch.no_grad():
        prefix_mask = torch.ones(len(texts), n, dtype=batch["attention_mask"].dtype)
        reference = base(
            input_ids=batch["input_ids"],
            token_type_ids=batch["token_type_ids"],
            attention_mask=torch.cat([prefix_mask, batch["attention_mask"]], 1),
            cache=stock.get_prompt(batch_size=len(texts)),
        ).logits
        inside = result.model.eval()(**batch).logits
    torch.testing.assert_close(inside, reference, rtol=0, atol=1e-5)
    assert not torch.allclose(reference[:, 0], reference[:, 0].mean())  # the examples differ: a real check

    predicted, _ = predict(out, str(data), tmp_path / "p.csv")
    with predicted.open() as fh:
        probs = torch.tensor([[float(r["p_neg"]), float(r["p_pos"])] for r in csv.DictReader(fh)])
    torch.testing.assert_close(probs, torch.softmax(reference, -1), rtol=0, atol=1e-5)
