"""Why ELECTRA's discriminator learns nothing in the CPU study: a controlled experiment.

    python bench/rtd_plateau.py [--steps 1000] [--corpus-dir outputs/rtd-plateau]

The study's discriminator (`recipes/study-objectives.yaml`: ELECTRA 2 x 128, blocks of 64, batch 32)
predicts "original" for every token after about 50 steps. Here a discriminator of that size trains
alone, without a generator, on the study's own corpus and tokenizer (built as `toolkit study` builds
them), 15% of the tokens replaced by a fixed sampler:

- `uniform`: replacements drawn uniformly from the vocabulary (an untrained generator). A replaced
  token is usually a rare one, so the token alone gives it away.
- `unigram`: replacements drawn by corpus frequency (the study's generator after ~50 steps is about
  this good: accuracy 8%). Replaced and original tokens then have the same distribution, and only
  the context can tell them apart.
- `slow`: uniform at first, then the mixture moves linearly to `unigram` over the first half of the
  steps (a generator that improves slowly, as one under a long warm-up would), unigram after.

and, as a control for the unigram task, a one-layer convolution over neighbouring tokens (a bigram
detector, no attention). Same optimizer as the study (AdamW, lr 1e-3, linear warm-up and decay,
clipping 1.0), seed 0. Printed per setting: the loss against the entropy of the replaced share (what
predicting the prior gives), and replaced-token recall and precision over the last 100 steps.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import REPO


def corpus_blocks(corpus_dir: Path, length: int):
    """The study's corpus and tokenizer (built once), cut into [CLS] ... [SEP] blocks of `length`."""
    from transformers import AutoTokenizer

    from toolkit import studies
    from toolkit.config import read_yaml, resolve

    recipe = resolve(
        studies.StudyRecipe, read_yaml(REPO / "recipes" / "study-objectives.yaml"), {"output_dir": str(corpus_dir)}
    )
    corpus_dir.mkdir(parents=True, exist_ok=True)
    corpus = corpus_dir / "corpus.txt"
    if not corpus.is_file():
        studies.build_corpus(recipe, corpus)
    tok = AutoTokenizer.from_pretrained(str(studies.train_tokenizer_once(recipe, corpus, corpus_dir / "tokenizer")))
    lines = [line for line in corpus.read_text().splitlines() if line.strip()]
    ids = []
    for i in range(0, len(lines), 2000):
        for piece in tok(lines[i : i + 2000], add_special_tokens=False)["input_ids"]:
            ids.extend(piece)
    ids = torch.tensor(ids)
    n = len(ids) // (length - 2)
    body = ids[: n * (length - 2)].view(n, length - 2)
    blocks = torch.cat([torch.full((n, 1), tok.cls_token_id), body, torch.full((n, 1), tok.sep_token_id)], 1)
    return blocks, len(tok), torch.bincount(ids, minlength=len(tok)).float()


class BigramDetector(torch.nn.Module):
    """Embeddings, one convolution over each token and its two neighbours, a linear output."""

    def __init__(self, vocab: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, 128)
        self.conv = torch.nn.Conv1d(128, 256, 3, padding=1)
        self.out = torch.nn.Linear(256, 1)

    def forward(self, input_ids):
        h = torch.relu(self.conv(self.embed(input_ids).transpose(1, 2))).transpose(1, 2)
        return self.out(h).squeeze(-1)


def discriminator(vocab: int):
    from transformers import ElectraConfig, ElectraForPreTraining

    config = ElectraConfig(
        vocab_size=vocab,
        embedding_size=128,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=512,
    )
    model = ElectraForPreTraining(config)
    return lambda ids: model(input_ids=ids).logits, model


def entropy(p: float) -> float:
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def train(name: str, sampler: str, blocks, vocab: int, freq, steps: int, batch: int = 32, lr: float = 1e-3):
    torch.manual_seed(0)
    if name == "bigram":
        model = BigramDetector(vocab)
        forward = model
    else:
        forward, model = discriminator(vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, int(0.06 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm)))
    )
    uniform, unigram = torch.ones(vocab) / vocab, freq / freq.sum()
    window = min(100, steps)  # the steps the printed figures average over
    tail = {"loss": 0.0, "prior": 0.0, "tp": 0, "pred": 0, "rep": 0}
    start = time.time()
    for step in range(steps):
        x = blocks[torch.randint(0, len(blocks), (batch,))]
        selected = torch.rand(x.shape) < 0.15
        selected[:, 0] = selected[:, -1] = False
        share = {"uniform": 0.0, "unigram": 1.0}.get(sampler, min(1.0, step / (steps / 2)))
        probs = (1 - share) * uniform + share * unigram
        replacement = torch.multinomial(probs, x.numel(), replacement=True).view(x.shape)
        corrupted = torch.where(selected, replacement, x)
        replaced = corrupted != x
        logits = forward(corrupted)
        loss = F.binary_cross_entropy_with_logits(logits, replaced.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step >= steps - window:
            predicted = logits.detach() > 0
            tail["loss"] += loss.item() / window
            tail["prior"] += entropy(replaced.float().mean().item()) / window
            tail["tp"] += (predicted & replaced).sum().item()
            tail["pred"] += predicted.sum().item()
            tail["rep"] += replaced.sum().item()
    recall = tail["tp"] / max(tail["rep"], 1)
    precision = tail["tp"] / max(tail["pred"], 1)
    print(
        f"{name:13s} {sampler:8s} {steps:6d}  {tail['loss']:.4f}  {tail['prior']:.4f}  "
        f"{tail['loss'] / tail['prior']:5.3f}  {recall:6.3f}  {precision:9.3f}  {time.time() - start:5.0f}",
        flush=True,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--corpus-dir", type=Path, default=REPO / "outputs" / "rtd-plateau")
    args = parser.parse_args(argv)
    blocks, vocab, freq = corpus_blocks(args.corpus_dir, 64)
    print(f"{len(blocks)} blocks of 64 tokens, vocabulary {vocab}; loss and recall over the last 100 steps")
    print("model         sampler   steps    loss  prior  loss/prior  recall  precision  seconds")
    train("electra-2x128", "uniform", blocks, vocab, freq, args.steps)
    train("electra-2x128", "unigram", blocks, vocab, freq, args.steps)
    train("electra-2x128", "slow", blocks, vocab, freq, args.steps)
    train("bigram", "unigram", blocks, vocab, freq, args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
