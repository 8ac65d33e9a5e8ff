"""Label smoothing as a client defense: the gradient of torch's smoothed cross-entropy, and no protection against
the exclusivity attack, which recomputes the smoothed loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fedleak
from fedleak.defenses import defended_gradient, make_defense
from fedleak.errors import OptionError


def test_the_defended_gradient_is_torchs_smoothed_cross_entropy(digits):
    model = fedleak.make_mlp(digits.input_shape, [64], 10, seed=0)
    x, y = digits.batch(6, seed=1)
    out = defended_gradient(model, x, y, "label-smoothing:smoothing=0.2")
    assert torch.allclose(out.labels.sum(1), torch.ones(6)) and torch.equal(out.inputs, x)
    expected = torch.autograd.grad(F.cross_entropy(model(x), y, label_smoothing=0.2), list(model.parameters()))
    for got, want in zip(out.update.gradients.values(), expected):
        assert torch.allclose(got, want, atol=1e-7, rtol=1e-6)
    # soft labels given (a mixing defense before it) are smoothed as torch smooths soft targets
    soft = torch.softmax(torch.randn(6, 10, generator=torch.Generator().manual_seed(0)), 1)
    _, smoothed = make_defense("label-smoothing", smoothing=0.2)(model, x, soft)
    want = torch.autograd.grad(F.cross_entropy(model(x), soft, label_smoothing=0.2), list(model.parameters()))
    got = torch.autograd.grad(F.cross_entropy(model(x), smoothed), list(model.parameters()))
    assert all(torch.allclose(a, b, atol=1e-7, rtol=1e-6) for a, b in zip(got, want))


def test_label_smoothing_does_not_stop_the_exclusivity_attack(fashion):
    model = fedleak.make_mlp(fashion.input_shape, [1024], 10, seed=0)
    x, y = fashion.batch(8, seed=8)
    plain = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x, y))
    sent = defended_gradient(model, x, y, "label-smoothing:smoothing=0.2").update
    rec = fedleak.reconstruct(model, sent, defense="label-smoothing:smoothing=0.2")
    scores = fedleak.metrics.match(rec, x, y)
    assert rec.num_certified == plain.num_certified >= 6 and not scores.false_certificate.any()
    assert any("label smoothing 0.2, which the certificate recomputes" in n for n in rec.notes)


@pytest.mark.parametrize("options, said", [({"smoothing": 1.0}, "below 1"), ({"smoothing": -0.1}, "at least 0"),
                                           ({"num_classes": 1}, "at least 2")])
def test_label_smoothing_options_are_checked(options, said):
    with pytest.raises(OptionError, match=said):
        make_defense("label-smoothing", **options)
