"""An eval-mode BatchNorm1d on the model's input, read as a map of it: certified only where the mode is shown."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from user_models import named_gradient, sized_gradient, warmed_norms

import fedleak
from fedleak.errors import ModelError
from fedleak.nets.dense_norms import fold_dense_norms


def normed(data: fedleak.Dataset, seed: int = 0, hidden_norm: bool = True) -> nn.Sequential:
    """Flatten, BatchNorm1d on the input, Linear, [BatchNorm1d], ReLU, Linear: its norms' statistics those of 256
    samples, their gamma and beta moved off 1 and 0; in eval mode."""
    torch.manual_seed(seed)
    d = data.x[0].numel()
    model = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(d, momentum=None), nn.Linear(d, 512),
                          *([nn.BatchNorm1d(512, momentum=None)] if hidden_norm else []), nn.ReLU(),
                          nn.Linear(512, data.num_classes))
    return warmed_norms(model, data, seed)


@pytest.mark.parametrize("batch", [1, 4])
def test_a_batch_from_a_client_in_eval_mode_is_certified_in_its_own_values(fashion, batch):
    model = normed(fashion)
    x, y = fashion.batch(batch, seed=batch)
    rec = fedleak.reconstruct(model, sized_gradient(model, x, y), attack="exclusivity")
    scores = fedleak.metrics.match(rec, x, y)
    assert rec.num_certified == batch and scores.recovered_fraction == 1.0 and scores.false_certificates == 0
    assert any("BatchNorm1d '1' on the model's input read as a map" in n for n in rec.notes)


def test_a_batch_normalised_by_its_own_statistics_is_not_certified(fashion):
    """A client in training mode: its gradient fits the first layer's inputs of its own normalisation, which the
    running statistics would map to wrong inputs (four false certificates before the mode was checked)."""
    model = normed(fashion, hidden_norm=False)
    x, y = fashion.batch(4, seed=4)
    rec = fedleak.reconstruct(model, sized_gradient(model, x, y, mode="train"), attack="exclusivity")
    assert rec.num_certified == 0 and fedleak.metrics.match(rec, x, y).false_certificates == 0
    assert "may have run in training mode" in rec.why_uncertified()


def test_tampered_norm_gradients_are_noticed(fashion):
    model = normed(fashion, hidden_norm=False)
    x, y = fashion.batch(4, seed=4)
    grads = named_gradient(model, x, y)
    grads["1.bias"] = grads["1.bias"] * 2
    rec = fedleak.reconstruct(model, grads, attack="exclusivity")
    assert rec.num_certified == 0 and "beta's gradient is not W^T" in rec.why_uncertified()


def test_the_twin_reads_the_input_norm_out_and_the_analysis_reads_it(fashion):
    model = normed(fashion)
    fold = fold_dense_norms(model)
    assert fold.input_norm.name == "1" and [f.norm for f in fold.folds] == ["3"]
    x, y = fashion.batch(8, seed=3)
    assert torch.allclose(fold.model(fold.input_norm.input_map(1e-7).apply(x)), model(x), atol=1e-5)
    report = fedleak.analyze_exclusivity(model, x, y)
    assert report.certifiable.sum() >= 1
    fished = fedleak.fish(model, x, y)  # through the norm's map, a scale and a shift per value, in the inputs
    assert fished.data_range == (0.0, 1.0) and fished.certifiable_after.all()
    rec = fedleak.reconstruct(model, sized_gradient(model, fished.inputs, y), attack="exclusivity")
    scores = fedleak.metrics.match(rec, fished.inputs, y)
    assert rec.num_certified == 8 and scores.false_certificates == 0 and int(scores.exact.sum()) == 8


def test_a_norm_after_arithmetic_on_the_input_is_refused(fashion):
    class Scaled(nn.Module):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x / 255)

    model = Scaled(normed(fashion, hidden_norm=False))
    x, y = fashion.batch(4, seed=4)
    with pytest.raises(ModelError, match="not one after arithmetic on the input"):
        fedleak.reconstruct(model, sized_gradient(model, x, y), attack="exclusivity")


@pytest.mark.parametrize("copies", [False, True])
def test_two_samples_normalised_in_training_mode_are_not_certified(fashion, copies):
    """Two samples (or two copies of one, which training mode maps to beta and which read as one sample there) in
    training mode: the first layer's inputs are consistent and certified, mapped by the running statistics they
    are wrong."""
    model = normed(fashion, hidden_norm=False)
    x, y = fashion.batch(2, seed=6)
    if copies:
        x, y = x[:1].repeat(2, 1, 1, 1), y[:1].repeat(2)
    rec = fedleak.reconstruct(model, sized_gradient(model, x, y, mode="train"), attack="exclusivity")
    assert fedleak.metrics.match(rec, x, y).false_certificates == 0 and rec.num_certified == 0


def test_a_class_that_views_its_input_by_its_size_is_read(digits):
    class Tabular(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.BatchNorm1d(64, momentum=None)
            self.body = nn.Sequential(nn.Linear(64, 256, bias=False), nn.BatchNorm1d(256), nn.ReLU(),
                                      nn.Linear(256, 10))

        def forward(self, x):
            return self.body(self.norm(x.view(x.size(0), -1)))  # x.size(0): a shape query beside the values

    torch.manual_seed(0)
    model = Tabular()
    with torch.no_grad():
        model.train()(digits.batch(256, seed=1)[0])
    model.eval()
    x, y = digits.batch(3, seed=5)
    rec = fedleak.reconstruct(model, sized_gradient(model, x, y), attack="exclusivity")
    scores = fedleak.metrics.match(rec, x, y)
    assert rec.num_certified == 3 and scores.recovered_fraction == 1.0 and scores.false_certificates == 0
