"""The focal loss (fedleak.focal): its gradient with respect to the logits is the cross-entropy's times a factor of
the label's probability, the clients train with it, and its exponent is checked."""

from __future__ import annotations

import pytest
import torch

import fedleak
from fedleak.focal import check_focal_gamma, focal_factor, focal_loss
from fedleak.nets.forward import loss_vectors


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 5.0])
def test_its_loss_vectors_are_autograd_s(gamma):
    """Logits from sure to unsure (a probability of the label near 1, near 0, and between): the loss vectors the
    attacks compute are torch autograd's gradient of the summed focal loss, to float64 rounding."""
    torch.manual_seed(0)
    logits = (torch.randn(64, 5, dtype=torch.float64) * torch.logspace(-1, 1.5, 64, dtype=torch.float64)[:, None])
    logits.requires_grad_(True)
    labels = torch.randint(0, 5, (64,))
    grad, = torch.autograd.grad(focal_loss(logits, labels, gamma, "sum"), logits)
    assert torch.allclose(loss_vectors(logits.detach(), labels, focal_gamma=gamma), grad, rtol=1e-10, atol=1e-14)


def test_its_factor_at_the_ends():
    log_p = torch.log(torch.tensor([0.0, 1e-300, 1e-6, 0.5, 1 - 1e-12, 1.0], dtype=torch.float64))
    s = focal_factor(log_p, 2.0)
    assert torch.isfinite(s).all() and float(s[-1]) == 0.0 and float(s[0]) == 1.0 and (s[:-1] > 0).all()
    assert torch.isfinite(focal_factor(log_p, 0.5)).all()  # (1 - p)^(γ - 1) with γ < 1 where p rounds to 1
    assert torch.equal(focal_factor(log_p, 0.0), torch.ones_like(log_p))


def test_clients_train_with_it(digits):
    """``compute_gradient_update`` and ``fedavg_update`` take ``focal_gamma`` as the loss the client trains with."""
    model = fedleak.make_mlp(digits.input_shape, [32], 10, seed=0)
    x, y = digits.batch(4, seed=0)
    names = [n for n, _ in model.named_parameters()]
    by_hand = dict(zip(names, torch.autograd.grad(focal_loss(model(x), y, 2.0), list(model.parameters()))))
    sent = fedleak.compute_gradient_update(model, x, y, focal_gamma=2.0).gradients
    assert all(torch.allclose(sent[k], by_hand[k]) for k in names)
    step = fedleak.fedavg_update(model, x, y, lr=0.5, focal_gamma=2.0)
    assert torch.allclose(step.before["1.weight"] - step.after["1.weight"], 0.5 * by_hand["1.weight"], atol=1e-7)


@pytest.mark.parametrize("kwargs, message", [
    ({"focal_gamma": -1.0}, r"focal_gamma must lie in \[0.0, 10.0\], got -1.0"),
    ({"focal_gamma": 11.0}, r"focal_gamma must lie in \[0.0, 10.0\]"),
    ({"focal_gamma": "2"}, "focal_gamma must be a real number"),
    ({"focal_gamma": 2.0, "label_smoothing": 0.1}, "focal_gamma with label_smoothing or class_weights"),
    ({"focal_gamma": 2.0, "class_weights": (1.0, 2.0)}, "focal_gamma with label_smoothing or class_weights"),
])
def test_bad_exponents_are_refused(kwargs, message):
    with pytest.raises(fedleak.FedleakError, match=message):
        check_focal_gamma(kwargs.pop("focal_gamma"), **kwargs)
