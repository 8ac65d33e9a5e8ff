"""The LeNet-style CNN builder."""

from __future__ import annotations

import pytest
import torch

import fedleak
from fedleak.models.cnn import make_lenet


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_shapes_and_seed(shape):
    a = make_lenet(shape, 10, seed=3)
    b = make_lenet(shape, 10, seed=3)
    c = make_lenet(shape, 10, seed=4)
    out = a(torch.rand(2, *shape))
    assert out.shape == (2, 10) and a.input_shape == shape
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_activation_and_rng_untouched():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    net = make_lenet((1, 8, 8), 10, activation="sigmoid")
    assert torch.equal(torch.rand(3), expected)
    assert isinstance(net[1], torch.nn.Sigmoid)


@pytest.mark.parametrize("kwargs", [dict(input_shape=(8, 8)), dict(activation="tanh"), dict(num_classes=1)])
def test_bad_arguments(kwargs):
    args = dict(input_shape=(1, 8, 8), num_classes=10) | kwargs
    with pytest.raises(fedleak.ModelError):
        make_lenet(**args)
