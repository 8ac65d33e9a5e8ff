"""MixUp and InstaHide on real digits: each defended sample is the stated convex mixture, with matching soft labels."""

from __future__ import annotations

import pytest
import torch
from user_models import FlowerNet

import fedleak
from fedleak.defenses import DefenseStack, defended_gradient, make_defense, parse_defense
from fedleak.errors import FedleakError, OptionError


def one_per_class(data: fedleak.Dataset, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first sample of each class 0..classes-1: a label names its sample, so soft labels name the mixture."""
    idx = [int(torch.nonzero(data.y == c)[0]) for c in range(classes)]
    return data.x[idx], data.y[idx]


@pytest.fixture(scope="module")
def batch(digits):
    return one_per_class(digits, 8)


@pytest.fixture(scope="module")
def mlp(digits):
    return fedleak.make_mlp(digits.input_shape, [32], 10, seed=0)


def label_mixture(x: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """``sum_c soft[i, c] * x_c`` for a batch holding class c at row c."""
    w = soft[:, : x.shape[0]].to(torch.float64)
    return torch.einsum("ic,c...->i...", w, x.to(torch.float64))


@pytest.mark.parametrize("k", [2, 4])
def test_mixup_rows_are_the_convex_mixture_the_labels_state(batch, mlp, k):
    x, y = batch
    out = defended_gradient(mlp, x, y, make_defense("mixup", k=k), seed=5)
    xm, soft = out.inputs, out.labels
    assert xm.shape == x.shape and soft.shape == (8, 10) and soft.dtype.is_floating_point
    assert torch.allclose(soft.sum(1), torch.ones(8), atol=1e-6) and bool((soft >= 0).all())
    assert soft[:, 8:].abs().max() == 0  # only classes of the batch appear
    assert int((soft > 0).sum(1).max()) <= k  # at most k samples per mixture
    assert bool((soft[torch.arange(8), y] > 0).all())  # sample i is in its own mixture (pi_1 = identity)
    assert torch.allclose(xm.double(), label_mixture(x, soft), atol=1e-6)
    # solve for the coefficients from the pixels alone: they are the soft labels, a convex combination
    flat = x.reshape(8, -1).double()
    coef = torch.linalg.lstsq(flat.T, xm.reshape(8, -1).double().T).solution.T
    assert torch.allclose(coef, soft[:, :8].double(), atol=1e-5)


def test_mixup_is_reproducible_for_a_seed_and_alpha_shapes_the_weights(batch, mlp):
    x, y = batch
    a = defended_gradient(mlp, x, y, "mixup", seed=1)
    b = defended_gradient(mlp, x, y, "mixup", seed=1)
    c = defended_gradient(mlp, x, y, "mixup", seed=2)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    assert not torch.allclose(a.inputs, c.inputs)
    peaked = [defended_gradient(mlp, x, y, "mixup:alpha=0.05", seed=s).labels.max(1).values.mean() for s in range(5)]
    flat = [defended_gradient(mlp, x, y, "mixup:alpha=20", seed=s).labels.max(1).values.mean() for s in range(5)]
    assert min(peaked) > 0.85 and max(flat) < 0.75  # Dirichlet(0.05) is near a vertex, Dirichlet(20) near the middle


def test_defended_gradient_is_the_gradient_of_the_mixed_batch(batch, mlp):
    x, y = batch
    out = defended_gradient(mlp, x, y, "mixup:k=3", seed=7)
    ref = fedleak.compute_gradient_update(mlp, out.inputs, out.labels)
    assert out.update.gradients.keys() == ref.gradients.keys()
    for name, g in ref.gradients.items():
        assert torch.allclose(out.update.gradients[name], g, atol=1e-7)
    plain = fedleak.compute_gradient_update(mlp, x, y).gradients
    assert any(not torch.allclose(plain[name], g) for name, g in out.update.gradients.items())


def test_flower_cnn_with_mixup_and_soft_labels_stacked(fashion):
    net = FlowerNet()
    torch.manual_seed(0)
    x, y = fashion.batch(4, seed=0)
    x3 = torch.nn.functional.pad(x, (2, 2, 2, 2)).repeat(1, 3, 1, 1)  # Fashion-MNIST as 3 x 32 x 32 images
    out = defended_gradient(net, x3, y, ["mixup", "mixup:k=3"], seed=3)  # the second mixes soft labels
    assert out.labels.shape == (4, 10) and torch.allclose(out.labels.sum(1), torch.ones(4), atol=1e-6)
    ref = fedleak.compute_gradient_update(net, out.inputs, out.labels)
    for name, g in ref.gradients.items():
        assert torch.allclose(out.update.gradients[name], g, atol=1e-6)


def test_mixup_batch_of_one_is_unchanged_and_num_classes(batch, mlp):
    x, y = batch
    xs, ys = make_defense("mixup")(mlp, x[:1], y[:1])
    assert xs is x[:1] or torch.equal(xs, x[:1])
    assert torch.equal(ys, y[:1])
    _, soft = make_defense("mixup", num_classes=12)(mlp, x, y)
    assert soft.shape == (8, 12)
    bound = DefenseStack.of("mixup").bind(num_classes=11)
    assert bound.defenses[0].num_classes == 11
    with pytest.raises(OptionError, match="num_classes"):
        make_defense("mixup", num_classes=5)(mlp, x, y)  # labels 5..7 do not fit


def test_model_modes_are_kept(digits):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.BatchNorm1d(16),
                                torch.nn.ReLU(), torch.nn.Linear(16, 10))
    x, y = digits.batch(6, seed=0)
    stats = model[2].running_mean.clone()
    make_defense("mixup")(model, x, y)  # reads the number of classes from one eval-mode forward pass
    assert model.training and model[2].training and torch.equal(model[2].running_mean, stats)


def test_instahide_flips_signs_of_the_mixture_around_the_middle(batch, mlp):
    x, y = batch
    out = defended_gradient(mlp, x, y, "instahide", seed=4)
    xi, soft = out.inputs, out.labels
    assert int((soft > 0).sum(1).max()) <= 4 and torch.allclose(soft.sum(1), torch.ones(8), atol=1e-6)
    assert bool((soft[torch.arange(8), y] > 0).all())
    mix = label_mixture(x, soft)
    assert torch.allclose((xi.double() - 0.5).abs(), (mix - 0.5).abs(), atol=1e-6)
    moved = (mix - 0.5).abs() > 1e-3
    flipped = ((xi.double() - 0.5) * (mix - 0.5) < 0) & moved
    share = float(flipped.sum()) / float(moved.sum())
    assert 0.4 < share < 0.6  # an independent fair sign per value
    assert float(xi.min()) >= 0 and float(xi.max()) <= 1
    again = defended_gradient(mlp, x, y, "instahide", seed=4)
    other = defended_gradient(mlp, x, y, "instahide", seed=5)
    assert torch.equal(again.inputs, xi) and not torch.allclose(other.inputs, xi)


def test_instahide_data_range(batch, mlp):
    x, y = batch
    xs = 2 * x - 1  # data in [-1, 1]: the middle is 0
    defense = DefenseStack.of("instahide").bind(data_range=(-1, 1)).defenses[0]
    assert defense.data_range == (-1.0, 1.0)
    torch.manual_seed(0)
    xi, soft = defense(mlp, xs, y)
    assert torch.allclose(xi.double().abs(), label_mixture(xs, soft).abs(), atol=1e-6)
    torch.manual_seed(0)
    xj, _ = make_defense("instahide")(mlp, xs, y)  # unbound: the batch's own [min, max]
    mid = 0.5 * (float(xs.min()) + float(xs.max()))
    assert torch.allclose((xj.double() - mid).abs(), (label_mixture(xs, soft) - mid).abs(), atol=1e-6)
    with pytest.raises(FedleakError, match="data range"):
        make_defense("instahide", data_range=(0.0, 1.0))(mlp, xs, y)


def test_instahide_keeps_data_normalised_per_channel_in_each_channel_s_range(batch):
    """Flipped around each channel's image of the pixels' middle, no channel leaves its own range; flipped around the
    middle of the channels' union, some values do (three channels of different statistics)."""
    x, y = batch
    norm = fedleak.normalization((0.2, 0.5, 0.8), (0.15, 0.25, 0.35))
    z = norm.apply(x.repeat(1, 3, 1, 1))
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * x[0].numel(), 10))
    outside = {}
    for told in (False, True):
        defense = DefenseStack.of("instahide").bind(data_range=norm.input_range,
                                                      normalization=norm if told else None).defenses[0]
        torch.manual_seed(0)
        pixels = norm.invert(defense(model, z, y)[0].double())
        outside[told] = int(((pixels < -1e-6) | (pixels > 1 + 1e-6)).sum())
    assert outside[False] > 0 and outside[True] == 0


@pytest.mark.parametrize("spec, match", [
    ("mixup:k=1", "k"), ("mixup:alpha=0", "alpha"), ("mixup:alpha=-1", "alpha"), ("mixup:num_classes=1", "num_classes"),
    ("mixup:alpha=abc", "alpha"), ("mixup:colour=red", "colour"), ("instahide:k=1", "k"), ("instahide:k=2.5", "k"),
])
def test_bad_parameters(spec, match):
    with pytest.raises(OptionError, match=match):
        parse_defense(spec)


def test_bad_parameters_by_keyword():
    with pytest.raises(OptionError, match="data_range"):
        make_defense("instahide", data_range=(1.0, 0.0))
    with pytest.raises(OptionError, match="alpha"):
        make_defense("mixup", alpha=float("nan"))
    with pytest.raises(OptionError, match="beta"):
        make_defense("mixup", beta=1.0)
