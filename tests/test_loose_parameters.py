"""A model whose weights are parameters used through functions, not layers: the exact methods say so and what to
do; the optimisation attacks take it where its logits come from ``F.linear`` of its parameters (the output layer
their label inference reads) and its input shape is known."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fedleak
from fedleak.errors import FedleakError
from fedleak.loose_parameters import loose_parameters


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.W1 = nn.Parameter(torch.randn(128, 64, generator=gen) / 8)
        self.b1 = nn.Parameter(torch.full((128,), 0.01))
        self.W2 = nn.Parameter(torch.randn(10, 128, generator=gen) / 11)
        self.b2 = nn.Parameter(torch.zeros(10))

    def forward(self, x):
        return F.linear(F.relu(x.flatten(1) @ self.W1.T + self.b1), self.W2, self.b2)


MATCH = r"weights \(W1, b1, W2, b2\) are parameters its forward uses through functions.*nn\.Linear"


def _update(model, x, y):
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    return fedleak.GradientUpdate(dict(zip([n for n, _ in model.named_parameters()], grads)), num_examples=len(x))


@pytest.mark.parametrize("attack, input_shape, match", [
    ("exclusivity", None, MATCH + r".*or pass input_shape="),  # no layer says the input's shape
    ("exclusivity", (1, 8, 8), r"node 'getattr\w*' .* computes a tensor from the parameter 'W1' \(a transpose"),
    ("first-layer", None, MATCH),
    ("first-layer", (1, 8, 8), MATCH),
])
def test_the_exact_methods_say_the_weights_are_not_in_layers(digits, attack, input_shape, match):
    x, y = digits.batch(1, seed=0)
    with pytest.raises(FedleakError, match=match):
        fedleak.reconstruct(Functional(), _update(Functional(), x, y), attack=attack, input_shape=input_shape)


def test_auto_runs_on_them_given_the_input_shape_the_layers_do_not_say(digits):
    model = Functional()  # its first weights are read by a matmul: no layer says the input's width
    x, y = digits.batch(1, seed=0)
    update = _update(model, x, y)
    with pytest.raises(FedleakError, match=MATCH + r".*or pass input_shape="):
        fedleak.reconstruct(model, update, attack="auto", budget=1)
    rec = fedleak.reconstruct(model, update, attack="auto", input_shape=(1, 8, 8), budget=1)
    assert rec.attack == "auto:ig" and rec.labels.tolist() == y.tolist()  # labels read off F.linear's bias
    assert "exact route skipped" in rec.samples[0].reason and "from the parameter 'W1'" in rec.samples[0].reason


class FunctionalCnn(nn.Module):
    """Every weight a parameter applied through F.conv2d and F.linear, as meta-learning code writes models
    (``forward(x, params=None)``)."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.k = nn.Parameter(torch.randn(4, 1, 3, 3, generator=gen) / 3)
        self.c = nn.Parameter(torch.zeros(4))
        self.w1 = nn.Parameter(torch.randn(32, 4 * 3 * 3, generator=gen) / 6)
        self.b1 = nn.Parameter(torch.zeros(32))
        self.w2 = nn.Parameter(torch.randn(10, 32, generator=gen) / 6)

    def forward(self, x, params=None):
        if params is not None:
            raise NotImplementedError
        h = F.max_pool2d(F.relu(F.conv2d(x, self.k, self.c)), 2)
        return F.log_softmax(F.linear(F.relu(F.linear(h.flatten(1), self.w1, self.b1)), self.w2, bias=None), 1)


def test_functional_layers_give_the_output_layer_and_the_input_shape(digits):
    from fedleak.attacks.labels import output_layer_names
    from fedleak.nets import input_shape_of

    model = FunctionalCnn()
    assert output_layer_names(model) == ("w2", None)  # through the log_softmax; F.linear without a bias
    assert input_shape_of(model)[0] == (1, 8, 8)  # F.conv2d's weight: one channel; the smallest side that fits
    assert output_layer_names(Functional()) == ("W2", "b2")
    x, y = digits.batch(3, seed=4)
    rec = fedleak.reconstruct(model, _update(model, x, y), attack="ig", iterations=5)
    assert tuple(rec.inputs.shape) == (3, 1, 8, 8) and sorted(rec.labels.tolist()) == sorted(y.tolist())


def test_a_model_with_layers_and_a_loose_parameter_is_not_told_so():
    class Temperature(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 10)
            self.t = nn.Parameter(torch.ones(()))

        def forward(self, x):
            return self.fc(x.flatten(1)) / self.t

    assert loose_parameters(Temperature()) == ""
    assert loose_parameters(nn.ReLU()) == ""  # nothing to say of a model without weights
    assert "W1" in loose_parameters(Functional())
