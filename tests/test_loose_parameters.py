"""A model whose weights are parameters used through functions, not layers: every attack says so and what to do."""

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


@pytest.mark.parametrize("attack", ["exclusivity", "first-layer", "auto"])
@pytest.mark.parametrize("input_shape", [None, (1, 8, 8)])
def test_every_attack_says_the_weights_are_not_in_layers(digits, attack, input_shape):
    model = Functional()
    x, y = digits.batch(1, seed=0)
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    update = fedleak.GradientUpdate(dict(zip(["W1", "b1", "W2", "b2"], grads)), num_examples=1)
    match = r"weights \(W1, b1, W2, b2\) are parameters its forward uses through functions.*nn\.Linear"
    with pytest.raises(FedleakError, match=match):
        fedleak.reconstruct(model, update, attack=attack, input_shape=input_shape)


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
