"""A FedAvg weight update read with the learning rate the server set: the change at the gradient's own scale, where a
blend of like samples shows. Real data (two-class LFW), a user's nn.Module, real torch.optim.SGD steps."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F
from user_models import DropoutMLP

import fedleak
from fedleak.update_files import load_update, save_update

pytestmark = pytest.mark.usefixtures("one_thread")


def _step(model, x, y, lr: float, **sgd) -> dict[str, torch.Tensor]:
    client = copy.deepcopy(model)
    opt = torch.optim.SGD(client.parameters(), lr=lr, **sgd)
    opt.zero_grad()
    F.cross_entropy(client(x), y).backward()
    opt.step()
    return client.state_dict()


@pytest.mark.parametrize("sgd", [{}, {"momentum": 0.9, "weight_decay": 5e-4}])
def test_the_known_rate_pins_the_scale(lfw, sgd):
    """Two classes at an unknown rate certify only where more than half of the batch does; at the known rate every
    sample at the gradient's scale can. A wrong rate certifies nothing wrong."""
    torch.manual_seed(0)
    model = DropoutMLP(625, 1024, 2).eval()
    counts = {}
    for seed in range(3):
        x, y = lfw.batch(16, seed=seed)
        after = _step(model, x, y, 0.1, **sgd)
        for lr in (None, 0.1, 0.2):
            rec = fedleak.reconstruct(model, after, num_examples=16, learning_rate=lr)
            assert not fedleak.metrics.match(rec, x, y).false_certificate.any()
            counts[lr] = counts.get(lr, 0) + rec.num_certified
            if lr == 0.1:
                assert any("learning rate given (0.1)" in n for n in rec.notes)
    assert counts[0.1] > counts[None] and counts[0.1] >= 6


def test_bad_learning_rates_and_the_file_round_trip(lfw, tmp_path):
    torch.manual_seed(0)
    model = DropoutMLP(625, 64, 2).eval()
    x, y = lfw.batch(4, seed=0)
    after = _step(model, x, y, 0.1)
    for bad in (0, -0.1, float("nan"), "0.1", True):
        with pytest.raises(fedleak.UpdateError, match="learning_rate"):
            fedleak.WeightUpdate(model.state_dict(), after, num_examples=4, learning_rate=bad)
    grads = fedleak.compute_gradient_update(model, x, y)
    with pytest.raises(fedleak.UpdateError, match="with a weight update"):
        fedleak.reconstruct(model, grads, learning_rate=0.1)
    update = fedleak.WeightUpdate(model.state_dict(), after, num_examples=4, learning_rate=0.1)
    with pytest.raises(fedleak.UpdateError, match="carries learning_rate 0.1"):
        fedleak.reconstruct(model, update, learning_rate=0.2)
    loaded = load_update(save_update(update, tmp_path / "u.safetensors"))
    assert loaded.learning_rate == 0.1 and loaded.num_examples == 4
