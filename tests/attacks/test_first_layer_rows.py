"""A batch's first-layer rows (``attack="first-layer"`` with ``num_examples`` other than 1): the inputs of units
that fire for one sample, uncertified, through layers the exclusivity attack cannot read."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fedleak
from fedleak import metrics
from fedleak.attacks.first_layer_rows import ROUTE


class ResidualNormMLP(nn.Module):
    """A ReLU layer, a residual block and a LayerNorm before the logits: no chain the exact route reads."""

    def __init__(self, d: int, width: int, classes: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, width), nn.Linear(width, width)
        self.norm, self.out = nn.LayerNorm(width), nn.Linear(width, classes)

    def forward(self, x):
        h = F.relu(self.fc1(x.flatten(1)))
        h = h + F.relu(self.fc2(h))
        return self.out(self.norm(h))


def _update(data, m: int, seed: int, width: int = 512):
    torch.manual_seed(seed)
    model = ResidualNormMLP(data.x[0].numel(), width, data.num_classes).eval()
    x, y = data.batch(m, seed=seed)
    return model, x, y, fedleak.compute_gradient_update(model, x, y)


@pytest.mark.parametrize("name", ["fashion", "lfw"])
def test_rows_give_exact_inputs_with_their_labels(name, request):
    """Ten classes and two: every input returned is one of the batch's, exactly, with its label; none certified."""
    data = request.getfixturevalue(name)
    model, x, y, update = _update(data, 8, 1)
    rec = fedleak.reconstruct(model, update, attack="first-layer")
    scores = metrics.match(rec, x, y)
    assert rec.num_certified == 0 and len(rec) >= 6
    assert scores.exact.sum() == len(rec) and scores.label_correct[scores.matched >= 0].all()
    assert all(s.route == ROUTE and s.witnesses[0] >= 2 for s in rec.samples)
    assert all("not certified" in s.reason for s in rec.samples)


def test_auto_holds_the_rows_and_searches_the_rest(fashion):
    """Where the exact route cannot read the model, ``auto`` returns the batch from its first-layer rows (all of a
    batch of 8 here, no search), and where they give part of it, holds those and lets IG search the rest."""
    model, x, y, update = _update(fashion, 8, 1, width=1024)
    rec = fedleak.reconstruct(model, update, attack="auto", budget=30, progress=False)
    assert rec.attack == "auto:first-layer" and len(rec) == 8 and metrics.match(rec, x, y).exact.all()
    model, x, y, update = _update(fashion, 32, 2)
    rows = fedleak.reconstruct(model, update, attack="first-layer")
    assert 1 <= len(rows) < 32
    rec = fedleak.reconstruct(model, update, attack="auto", budget=30, progress=False, iterations=3)
    assert rec.attack == "auto:first-layer+ig" and len(rec) == 32
    assert torch.equal(rec.inputs[: len(rows)], rows.inputs) and all(s.route == ROUTE for s in rec.samples[: len(rows)])


def test_bad_row_options_are_refused(fashion):
    model, x, y, update = _update(fashion, 2, 0)
    with pytest.raises(fedleak.FedleakError, match="group_tol must lie in"):
        fedleak.reconstruct(model, update, attack="first-layer", group_tol=2.0)
