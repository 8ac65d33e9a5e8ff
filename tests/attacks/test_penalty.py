"""A gradient whose loss held an L2 penalty (``loss + lambda sum w^2``): the penalty is read off the units no sample
activated, peeled, and the batch certified as without it. Real data (digits), real autograd, a user's nn.Module."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from user_models import DropoutMLP

import fedleak
from fedleak.attacks.exact.penalty import read_penalty
from fedleak.nets import as_network
from fedleak.update_kind import describe_update

pytestmark = pytest.mark.usefixtures("one_thread")


def _gradient(model, x, y, lam: float, biases: bool = True) -> dict[str, torch.Tensor]:
    model.zero_grad()
    penalty = sum((p * p).sum() for n, p in model.named_parameters() if biases or n.endswith("weight"))
    (F.cross_entropy(model(x), y) + lam * penalty).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _model(seed: int) -> DropoutMLP:
    torch.manual_seed(seed)
    return DropoutMLP(64, 512, 10).eval()


@pytest.mark.parametrize("lam", [1e-4, 1e-2])
def test_a_penalised_gradient_certifies_what_the_plain_one_does(digits, lam):
    """Before, no unit's rows gave an input: 0 rebuilt."""
    x, y = digits.batch(8, seed=1)
    model = _model(1)
    plain = fedleak.reconstruct(model, fedleak.GradientUpdate(_gradient(model, x, y, 0.0), num_examples=8))
    rec = fedleak.reconstruct(model, fedleak.GradientUpdate(_gradient(model, x, y, lam), num_examples=8))
    assert plain.num_certified >= 4
    assert rec.num_certified == plain.num_certified
    scores = fedleak.metrics.match(rec, x, y)
    assert not scores.false_certificate.any() and scores.recovered[:].sum() >= rec.num_certified
    assert any("L2 penalty" in n for n in rec.notes)


def test_the_factor_is_read_within_its_interval_and_undecayed_biases_are_told(digits):
    x, y = digits.batch(8, seed=2)
    model = _model(2)
    net = as_network(model)
    update = fedleak.GradientUpdate(_gradient(model, x, y, 1e-3, biases=False), num_examples=8)
    penalty = read_penalty(model, net, update, None)
    assert penalty.decay.weight.lo <= 2e-3 <= penalty.decay.weight.hi and penalty.decay.bias.value == 0.0
    g = _gradient(model, x, y, 0.0)
    for name, peeled in penalty.update.gradients.items():  # every entry of the peeled gradient within its bound
        assert ((peeled.double() - g[name].double()).abs() <= penalty.noise[name].whole()).all(), name
    assert read_penalty(model, net, fedleak.GradientUpdate(g, num_examples=8), None) is None


def test_the_update_s_kind_names_the_penalty(digits):
    x, y = digits.batch(8, seed=3)
    model = _model(3)
    kind = describe_update(fedleak.GradientUpdate(_gradient(model, x, y, 1e-3), num_examples=8), model)
    assert kind.weight_decay and "L2 penalty in the loss" in kind.summary() and not kind.noised
    plain = describe_update(fedleak.GradientUpdate(_gradient(model, x, y, 0.0), num_examples=8), model)
    assert not plain.weight_decay and "L2 penalty" not in plain.summary()
