"""Clipped noise on transmitted weights, and what it does to the attacks."""

from __future__ import annotations

import pytest
import torch

import fedleak
from fedleak.clients import fedavg_update
from fedleak.defenses.weight_noise import add_weight_noise, clip_rows

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def setting(digits):
    x, y = digits.batch(2, seed=41)
    model = fedleak.make_mlp(digits.input_shape, [256], 10, seed=0)
    return model, x, y, fedavg_update(model, x, y, lr=0.5)


def test_clip_and_noise_statistics(setting):
    _, _, _, upd = setting
    clipped = add_weight_noise(upd, 0.0, clip=1e-3)
    for name, d in clipped.delta().items():
        rows = d.reshape(1, -1) if d.ndim == 1 else d.reshape(d.shape[0], -1)
        assert float(rows.norm(dim=1).max()) <= 1e-3 * (1 + 1e-4)
    assert all(torch.equal(clipped.before[k], upd.before[k]) for k in upd.before)  # server's weights intact
    noisy = add_weight_noise(upd, 0.01, seed=3)
    diff = torch.cat([(noisy.after[k] - upd.after[k]).flatten() for k in upd.after])
    assert abs(float(diff.std()) - 0.01) < 0.001 and abs(float(diff.mean())) < 0.001
    lap = add_weight_noise(upd, 0.01, distribution="laplace", seed=3)
    ldiff = torch.cat([(lap.after[k] - upd.after[k]).flatten() for k in upd.after])
    assert abs(float(ldiff.abs().mean()) - 0.01) < 0.001  # E|Laplace(0, b)| = b
    assert torch.equal(add_weight_noise(upd, 0.01, seed=3).after["1.weight"], noisy.after["1.weight"])
    t = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    torch.testing.assert_close(clip_rows(t, 1.0), torch.tensor([[0.6, 0.8], [0.3, 0.4]]))


def test_noise_stops_the_exact_route(setting):
    model, x, y, upd = setting
    clean = fedleak.metrics.match(fedleak.reconstruct(model, upd, attack="auto"), x, y)
    assert clean.recovered.all()
    noisy = add_weight_noise(upd, 1e-3, seed=0)
    rec = fedleak.reconstruct(model, noisy, attack="auto", iterations=50)
    scores = fedleak.metrics.match(rec, x, y)
    assert not scores.recovered.any() and not scores.false_certificate.any()  # no false certificate


def test_gradient_updates_and_bad_strengths(setting):
    model, x, y, upd = setting
    g = fedleak.compute_gradient_update(model, x, y)
    ng = add_weight_noise(g, 1e-2, clip=0.1, seed=1)
    assert isinstance(ng, fedleak.GradientUpdate) and ng.num_examples == 2
    for bad in (dict(sigma=-1.0), dict(sigma=float("nan")), dict(sigma=0.1, clip=0.0),
                dict(sigma=0.1, distribution="cauchy")):
        with pytest.raises(fedleak.FedleakError):
            add_weight_noise(upd, **bad)
