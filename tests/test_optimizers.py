"""`training.optimizer`: the named optimizer is the one that runs, and each lowers the loss on real text;
8-bit AdamW says clearly when the hardware cannot; a DeepSpeed optimizer section gets a placeholder."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert_recipe

from toolkit.config import TrainingArgs
from toolkit.engine.optim import check_8bit_support, make_optimizer, optimizer_name
from toolkit.errors import ToolkitError
from toolkit.pretraining import pretrain


@pytest.mark.parametrize(
    "name, implementation, learning_rate",
    [
        ("adamw", "torch.optim.adamw.AdamW", 2e-3),
        ("lamb", "pytorch_optimizer.optimizer.lamb.Lamb", 5e-2),  # trust-ratio steps: a fraction of each weight norm
        ("adamw_8bit", "bitsandbytes.optim.adamw.AdamW8bit", 2e-3),
    ],
)
def test_each_optimizer_runs_as_named_and_lowers_the_loss(
    tmp_path, corpus_dir, wordpiece_dir, name, implementation, learning_rate
):
    recipe = tiny_bert_recipe(
        tmp_path / name, corpus_dir, wordpiece_dir, max_steps=12, optimizer=name, learning_rate=learning_rate
    )
    result = pretrain(recipe)
    assert result.metrics["optimizer"] == implementation
    # the same validation blocks and masks before and after 12 steps on Shakespeare
    before, after = result.metrics["initial_eval_loss"], result.metrics["eval_loss"]
    assert after < before - 0.1, (before, after)


def test_lamb_steps_are_the_papers_trust_ratio_update_computed_by_hand():
    """Three steps of `training.optimizer=lamb` on a tiny layer equal LAMB written out by hand, per tensor:
    r = m / (sqrt(v) + eps) + weight_decay * w (moments without bias correction), then
    w <- w - lr * min(||w||, 10) / ||r|| * r, so each step moves a tensor by lr * its (clamped) norm.
    (Measured once against torch_optimizer.Lamb, which this replaced: 20 steps of a small MLP agree
    within 3e-8.) The library's defaults (decoupled decay, a 1 / (1 - beta1^t) step size) would fail here."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2).double()
    lr, decay, eps = 0.1, {"weight": 0.2, "bias": 0.0}, 1e-8  # biases are never decayed
    t = TrainingArgs(optimizer="lamb", learning_rate=lr, weight_decay=decay["weight"], adam_epsilon=eps)
    optimizer = make_optimizer(layer, t, torch.device("cpu"))
    params = dict(layer.named_parameters())
    expected = {k: p.detach().clone() for k, p in params.items()}
    m = {k: torch.zeros_like(p) for k, p in expected.items()}
    v = {k: torch.zeros_like(p) for k, p in expected.items()}
    x = torch.randn(5, 3, dtype=torch.float64)
    for _ in range(3):
        optimizer.zero_grad()
        layer(x).pow(2).sum().backward()
        grads = {k: p.grad.clone() for k, p in params.items()}
        optimizer.step()
        for k, g in grads.items():
            m[k] = 0.9 * m[k] + 0.1 * g
            v[k] = 0.999 * v[k] + 0.001 * g * g
            r = m[k] / (v[k].sqrt() + eps) + decay[k] * expected[k]
            step = lr * expected[k].norm().clamp(max=10) / r.norm() * r
            assert step.norm() == pytest.approx(lr * expected[k].norm().item(), rel=1e-9)
            expected[k] = expected[k] - step
            torch.testing.assert_close(params[k].detach(), expected[k], rtol=1e-7, atol=1e-10)


def test_optimizer_name_sees_through_wrappers():
    from accelerate.optimizer import AcceleratedOptimizer

    inner = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    assert optimizer_name(AcceleratedOptimizer(inner, device_placement=False)) == "torch.optim.sgd.SGD"


def test_8bit_adamw_says_clearly_when_the_hardware_cannot(monkeypatch):
    import bitsandbytes as bnb

    check_8bit_support(torch.device("cpu"))  # bitsandbytes has a CPU backend here

    class NoKernel(bnb.optim.AdamW8bit):
        def step(self, closure=None):
            raise RuntimeError("no 8-bit optimizer kernel for this device\nmore detail")

    monkeypatch.setattr(bnb.optim, "AdamW8bit", NoKernel)
    with pytest.raises(
        ToolkitError, match=r"cannot run its 8-bit AdamW on this cpu device \(no 8-bit optimizer kernel"
    ):
        check_8bit_support(torch.device("cpu"))


def test_a_deepspeed_optimizer_section_gets_a_placeholder_with_the_recipe_values():
    from accelerate.utils import DummyOptim

    model = torch.nn.Linear(4, 4)
    t = TrainingArgs(learning_rate=3e-4, weight_decay=0.05)
    opt = make_optimizer(model, t, torch.device("cpu"), {"optimizer": {"type": "AdamW"}})
    assert isinstance(opt, DummyOptim) and opt.lr == 3e-4 and opt.weight_decay == 0.05
    # biases and norms without decay, as for the toolkit's own optimizers
    assert [g["weight_decay"] for g in opt.params] == [0.05, 0.0]
    assert isinstance(make_optimizer(model, t, torch.device("cpu"), {"zero_optimization": {}}), torch.optim.AdamW)
