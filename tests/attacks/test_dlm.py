"""DLM and DLM+ on FedAvg weight updates with an unknown learning rate."""

from __future__ import annotations

import pytest
import torch

import fedleak
from fedleak.clients import fedavg_update
from fedleak.models.cnn import make_lenet

pytestmark = pytest.mark.usefixtures("one_thread")



def _random_guess_psnr(x: torch.Tensor) -> float:
    guess = torch.rand(x.shape, generator=torch.Generator().manual_seed(0))
    return fedleak.metrics.match(guess, x).mean_psnr()


@pytest.mark.parametrize("attack", ["dlm", "dlm+"])
def test_several_local_steps_mlp(digits, attack):
    x, y = digits.batch(2, seed=21)
    model = fedleak.make_mlp(digits.input_shape, [32], 10, seed=0)
    update = fedavg_update(model, x, y, lr=0.05, local_steps=4, reveal_local_steps=True)
    rec = fedleak.reconstruct(model, update, attack=attack, iterations=300, seed=1)
    scores = fedleak.metrics.match(rec, x, y)
    assert rec.iterations == 300 and not rec.certified.any() and rec.batch_size == 2
    assert scores.label_accuracy == 1.0
    assert scores.mean_psnr() > 25 > _random_guess_psnr(x) + 10
    assert any("4 local sgd step(s) unrolled" in n for n in rec.notes)
    if attack == "dlm":  # the learned learning rate lands near the client's (0.05)
        lr = float(next(n for n in rec.notes if "learned client learning rate" in n).split()[-1])
        assert 0.03 < lr < 0.08


def test_dlm_plus_on_lenet_one_sample(digits):
    x, y = digits.batch(1, seed=22)
    model = make_lenet(digits.input_shape, 10, activation="sigmoid", seed=0)
    update = fedavg_update(model, x, y, lr=0.1, local_steps=2, reveal_local_steps=True)
    rec = fedleak.reconstruct(model, update, attack="dlm+", iterations=150)
    assert fedleak.metrics.match(rec, x, y).mean_psnr() > 20


def test_unknown_steps_are_treated_as_one_aggregated_step(digits):
    x, y = digits.batch(1, seed=23)
    model = fedleak.make_mlp(digits.input_shape, [32], 10, seed=0)
    update = fedavg_update(model, x, y, lr=0.05, local_steps=2)  # steps not revealed
    rec = fedleak.reconstruct(model, update, attack="dlm+", iterations=200)
    assert any("treated as one aggregated" in n for n in rec.notes)
    assert fedleak.metrics.match(rec, x, y).mean_psnr() > 20


def test_weights_only(digits):
    x, y = digits.batch(1, seed=24)
    model = fedleak.make_mlp(digits.input_shape, [8], 10, seed=0)
    with pytest.raises(fedleak.FedleakError, match="does not run on gradient"):
        fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x, y), attack="dlm")


def test_refine_adds_lbfgs_evaluations_within_budget(digits):
    x, y = digits.batch(1, seed=25)
    model = fedleak.make_mlp(digits.input_shape, [16], 10, seed=0)
    update = fedavg_update(model, x, y, lr=0.05, local_steps=2, reveal_local_steps=True)
    rec = fedleak.reconstruct(model, update, attack="dlm", iterations=40, refine=10)
    assert 40 < rec.iterations <= 50
    with pytest.raises(fedleak.FedleakError, match="refine"):
        fedleak.reconstruct(model, update, attack="dlm", refine=-1)


def test_signed_dlm_plus_on_fashion_lenet_several_steps(fashion):
    # signed Adam steps (the option of the Fashion-MNIST LeNet benchmark rows): ~70 dB here in 150 iterations,
    # where plain Adam reaches ~30 dB
    x, y = fashion.batch(1, seed=26)
    model = make_lenet(fashion.input_shape, 10, activation="sigmoid", seed=0)
    update = fedavg_update(model, x, y, lr=0.05, local_steps=3, reveal_local_steps=True)
    rec = fedleak.reconstruct(model, update, attack="dlm+", iterations=150, signed=True)
    assert rec.iterations == 150
    assert fedleak.metrics.match(rec, x, y).mean_psnr() > 45
