"""A model with a layer its forward never calls: the gradients a client sends for it (None, absent, zeros) are read,
and fedleak's own client and attacks differentiate such a model."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fedleak
from fedleak.errors import UpdateError


class WithSpare(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 256)
        self.fc2 = nn.Linear(256, 10)
        self.aux = nn.Linear(256, 4)  # an auxiliary head this forward does not call

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def _grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor | None]:
    """``[p.grad for p in model.parameters()]`` after ``loss.backward()``, as a client sends it."""
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("form", ["list with None", "dict with None", "dict without them", "GradientUpdate"])
def test_a_client_s_gradients_with_none_for_an_unused_layer_are_read(digits, form):
    torch.manual_seed(0)
    model = WithSpare().eval()
    x, y = digits.batch(6, seed=1)
    grads = _grads(model, x, y)
    names = [n for n, _ in model.named_parameters()]
    assert grads[names.index("aux.weight")] is None
    update = {"list with None": grads, "dict with None": dict(zip(names, grads)),
              "dict without them": {n: g for n, g in zip(names, grads) if g is not None},
              "GradientUpdate": fedleak.GradientUpdate(dict(zip(names, grads)), num_examples=6)}[form]
    rec = fedleak.reconstruct(model, update, num_examples=6)
    result = fedleak.metrics.match(rec, x, y, data_range=digits.value_range)
    assert rec.num_certified >= 4 and result.false_certificates == 0
    assert any("no gradient for aux.weight, aux.bias (None or absent)" in n for n in rec.notes)


def test_none_for_a_layer_the_forward_uses_is_still_refused(digits):
    model = WithSpare().eval()
    x, y = digits.batch(4, seed=1)
    grads = _grads(model, x, y)
    grads[0] = None  # fc1.weight: used, so its gradient was not sent
    with pytest.raises(UpdateError, match=r"missing \['fc1.weight'\]"):
        fedleak.reconstruct(model, grads)
    with pytest.raises(UpdateError, match="every entry is None"):
        fedleak.GradientUpdate({"fc1.weight": None})


def test_fedleak_s_client_and_the_searches_differentiate_such_a_model(digits):
    torch.manual_seed(0)
    model = WithSpare().eval()
    x, y = digits.batch(1, seed=2)
    update = fedleak.compute_gradient_update(model, x, y)
    assert torch.count_nonzero(update.gradients["aux.weight"]) == 0 and update.gradients["fc1.weight"].abs().sum() > 0
    rec = fedleak.reconstruct(model, update, attack="ig", iterations=20, input_shape=(1, 8, 8), seed=0)
    assert torch.isfinite(rec.inputs).all()
    defended = fedleak.defended_gradient(model, x, y, "gradient-pruning:ratio=0.5")
    assert torch.count_nonzero(defended.update.gradients["aux.bias"]) == 0


def test_an_unused_layer_in_a_model_that_normalises_inside_forward(digits):
    """The exact methods read such a model without its input arithmetic (a graph module traced from it, which holds
    only what forward reads): the unused layer's parameters are kept under their names."""

    class Normalising(WithSpare):
        def forward(self, x):
            return super().forward((x.float() - 0.3) / 0.35)

    torch.manual_seed(0)
    model = Normalising().eval()
    x, y = digits.batch(6, seed=1)
    for update in (_grads(model, x, y), fedleak.compute_gradient_update(model, x, y)):
        rec = fedleak.reconstruct(model, update, num_examples=6)
        assert rec.num_certified >= 4
        assert fedleak.metrics.match(rec, x, y, data_range=digits.value_range).false_certificates == 0
