"""An eval-mode BatchNorm1d after a ReLU (Linear, ReLU, BatchNorm1d, Dropout, Linear: as tabular MLPs are written),
folded into the Linear layer that reads it."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from user_models import named_gradient, sized_gradient, warmed_norms

import fedleak
from fedleak.errors import ModelError
from fedleak.nets.dense_norms import fold_dense_norms


class TabularMLP(nn.Module):
    """Linear -> ReLU -> BatchNorm1d -> Dropout, twice, then the output layer."""

    def __init__(self, d_in: int, k: int, affine: bool = True) -> None:
        super().__init__()
        self.fc1, self.bn1 = nn.Linear(d_in, 512), nn.BatchNorm1d(512, affine=affine)
        self.fc2, self.bn2 = nn.Linear(512, 256), nn.BatchNorm1d(256, affine=affine)
        self.drop = nn.Dropout(0.2)
        self.out = nn.Linear(256, k)

    def forward(self, x):
        x = self.drop(self.bn1(F.relu(self.fc1(x.view(x.size(0), -1)))))
        x = self.drop(self.bn2(F.relu(self.fc2(x))))
        return self.out(x)


@pytest.mark.parametrize("affine", [True, False])
def test_the_twin_computes_the_model_and_its_gradient_is_the_twins(digits, affine):
    model = warmed_norms(TabularMLP(64, 10, affine), digits)
    folded = fold_dense_norms(model)
    assert [f.norm for f in folded.folds] == ["bn1", "bn2"] and [f.linear for f in folded.folds] == ["fc2", "out"]
    x, y = digits.batch(8, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(folded.model(x), model(x), rtol=1e-5, atol=1e-5)
    read = folded.gradient(fedleak.GradientUpdate(named_gradient(model, x, y)))
    assert not read.reason
    twin = dict(zip([n for n, _ in folded.model.named_parameters()],
                    torch.autograd.grad(F.cross_entropy(folded.model(x), y), list(folded.model.parameters()))))
    assert set(read.update.gradients) == set(twin)
    for name, g in twin.items():
        torch.testing.assert_close(read.update.gradients[name], g, rtol=1e-4, atol=1e-6)


def test_eval_mode_clients_certify_and_training_mode_ones_are_caught(digits):
    model = warmed_norms(TabularMLP(64, 10), digits)
    x, y = digits.batch(6, seed=3)
    rec = fedleak.reconstruct(model, sized_gradient(model, x, y))
    scores = fedleak.metrics.match(rec, x, y, data_range=digits.value_range)
    assert rec.num_certified >= 4 and scores.false_certificates == 0
    assert any("after a ReLU" in n and "folded" in n for n in rec.notes)
    trained = fedleak.reconstruct(model, sized_gradient(model, x, y, mode="train"), attack="exclusivity")
    assert trained.num_certified == 0
    assert "eval mode" in trained.why_uncertified()


def test_a_norm_whose_unit_has_gamma_zero_is_refused_by_name(digits):
    model = warmed_norms(TabularMLP(64, 10), digits)
    with torch.no_grad():
        model.bn2.weight[7] = 0.0
    with pytest.raises(ModelError, match=r"'bn2' has gamma = 0 on unit\(s\) \[7\]"):
        fold_dense_norms(model)
