"""Update sparsification, and what it does to the attacks."""

from __future__ import annotations

import pytest
import torch

import fedleak
from fedleak.clients import fedavg_update
from fedleak.defenses.sparsification import prune_smallest, sparsify_update

pytestmark = pytest.mark.usefixtures("one_thread")


def test_prune_keeps_the_largest_entries():
    t = torch.tensor([[0.1, -5.0, 0.3], [2.0, -0.2, 0.0]])
    torch.testing.assert_close(prune_smallest(t, 0.5), torch.tensor([[0.0, -5.0, 0.3], [2.0, 0.0, 0.0]]))
    assert torch.equal(prune_smallest(t, 0.0), t)


def test_sparsified_weight_update(digits):
    x, y = digits.batch(2, seed=51)
    model = fedleak.make_mlp(digits.input_shape, [256], 10, seed=0)
    upd = fedavg_update(model, x, y, lr=0.5)
    sp = sparsify_update(upd, 0.9)
    for name, d in sp.delta().items():
        assert (d == 0).float().mean() >= 0.9 - 1 / d.numel()
    assert all(torch.equal(sp.before[k], upd.before[k]) for k in upd.before)
    rec = fedleak.reconstruct(model, sp, attack="auto", iterations=50)
    scores = fedleak.metrics.match(rec, x, y)
    assert not scores.recovered.any() and not scores.false_certificate.any()
    assert isinstance(sparsify_update(fedleak.compute_gradient_update(model, x, y), 0.5), fedleak.GradientUpdate)
    for bad in (-0.1, 1.0, 2.0):
        with pytest.raises(fedleak.FedleakError, match="sparsity"):
            sparsify_update(upd, bad)
