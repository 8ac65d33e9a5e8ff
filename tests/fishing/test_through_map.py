"""Fishing and exclusivity reduction of a model that normalises its input inside ``forward``
(fedleak.fishing.through_map): they perturb what the first layer reads and hand back the model's inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fedleak
from fedleak.defenses import DefenseStack, make_defense
from fedleak.defenses.exclusivity_reduction import reduce_exclusivity
from fedleak.fishing.through_map import first_layer_batch


class Normalising(nn.Module):
    """A user's MLP on 8 x 8 images that computes ``(x - mean) / std`` first (buffers: one number, or per pixel)."""

    def __init__(self, per_pixel: bool = False) -> None:
        super().__init__()
        shape = (1, 8, 8) if per_pixel else ()
        self.register_buffer("mean", torch.full(shape, 0.3) + (torch.linspace(0, 0.1, 64).view(shape)
                                                               if per_pixel else 0.0))
        self.register_buffer("std", torch.full(shape, 0.35))
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = (x - self.mean) / self.std
        return self.fc2(F.relu(self.fc1(x.view(x.size(0), -1))))


def _gradient(model, x, y):
    """The client's gradient and its batch size (without it, near-copies would read alike: nothing is certified)."""
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    return fedleak.GradientUpdate({n: g for (n, _), g in zip(model.named_parameters(), grads)}, num_examples=len(x))


def test_fishing_a_normalising_model_moves_its_pixels_and_every_sample_is_certified(digits):
    """The fished batch is in pixels, inside [0, 1]; the client's own gradient of it (through the model's
    normalisation) certifies every sample, each the fished image; the perturbation is the one fishing finds on the
    normalised batch with the model without its normalisation, mapped back (sizes over 1 / 0.35)."""
    torch.manual_seed(0)
    model = Normalising().eval()
    x, y = digits.batch(12, seed=2)
    result = fedleak.fish(model, x, y)
    assert result.data_range == (0.0, 1.0) and result.inputs.shape == x.shape
    assert float(result.inputs.min()) >= 0.0 and float(result.inputs.max()) <= 1.0
    assert result.certifiable_after.all()
    rec = fedleak.reconstruct(model, _gradient(model, result.inputs, y))
    score = fedleak.metrics.match(rec, result.inputs, y, data_range=(0.0, 1.0))
    assert rec.num_certified == 12 and score.false_certificates == 0 and int(score.exact.sum()) == 12
    first = first_layer_batch(model, x)  # the same fishing, on the model without its map and the normalised batch
    assert first.input_map is not None and torch.equal(first.first, first.input_map.to_first_layer(x))
    ends = (-0.3 / 0.35 - 1e-6, 0.7 / 0.35 + 1e-6)  # [0, 1] through the map, beside float32's rounding of the ends
    twin = fedleak.fish(first.model, first.first, y, data_range=ends)
    assert torch.allclose(result.inputs, first.input_map.to_inputs(twin.inputs).clamp(0, 1), atol=1e-5)
    assert [s.linf for s in result.samples] == pytest.approx([s.linf * 0.35 for s in twin.samples], rel=1e-3, abs=1e-6)
    assert [s.psnr for s in result.samples] == pytest.approx([s.psnr for s in twin.samples], rel=1e-3)


def test_reducing_a_normalising_model_s_exclusivity_leaves_nothing_certified(digits):
    torch.manual_seed(1)
    model = Normalising().eval()
    x, y = digits.batch(8, seed=3)
    assert fedleak.reconstruct(model, _gradient(model, x, y)).num_certified > 0
    result = reduce_exclusivity(model, x, y)
    assert result.protected and result.data_range == (0.0, 1.0)
    assert float(result.inputs.min()) >= 0.0 and float(result.inputs.max()) <= 1.0
    assert fedleak.reconstruct(model, _gradient(model, result.inputs, result.labels)).num_certified == 0


class ColourNet(nn.Module):
    """A user's CNN for 32 x 32 colour images that normalises per channel first (CIFAR-10's statistics, buffers)."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1))
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 32 * 32, 256)
        self.fc2 = nn.Linear(256, classes)

    def forward(self, x):
        x = (x - self.mean) / self.std
        x = F.relu(self.conv(x))
        return self.fc2(F.relu(self.fc1(x.view(x.size(0), -1))))


def _fished_and_rebuilt(model, x, y, **reconstruct):
    """Fish, let the client compute its gradient of the fished batch through its own forward, and attack it."""
    result = fedleak.fish(model, x, y)
    assert result.data_range == (0.0, 1.0) and float(result.inputs.min()) >= 0.0 and float(result.inputs.max()) <= 1.0
    for s in result.samples:  # sizes in pixels: what the batch sent differs by
        assert s.linf == pytest.approx(float((result.inputs[s.index] - x[s.index]).abs().max()), rel=1e-3, abs=1e-6)
    rec = fedleak.reconstruct(model, _gradient(model, result.inputs, y), **reconstruct)
    return result, rec, fedleak.metrics.match(rec, result.inputs, y, data_range=(0.0, 1.0))


def test_a_normalisation_per_pixel_is_fished_in_pixels(digits):
    torch.manual_seed(3)
    model = Normalising(per_pixel=True).eval()
    x, y = digits.batch(12, seed=0)
    result, rec, score = _fished_and_rebuilt(model, x, y, input_shape=digits.input_shape)
    assert not result.certifiable_before.all() and result.certifiable_after.all()
    assert rec.num_certified == 12 and score.false_certificates == 0 and int(score.exact.sum()) == 12


def test_a_colour_cnn_normalising_per_channel_is_fished_and_reduced_in_pixels():
    """Per channel, [0, 1] in pixels is a box of different sides in what the conv reads (zero-padded there): the LPs
    are written over the pixels, so every fished value stays in [0, 1] and each sample is rebuilt, certified, from
    the client's own gradient; exclusivity reduction of the same batch leaves nothing certified."""
    data = fedleak.load_dataset("retina")
    torch.manual_seed(0)
    model = ColourNet(data.num_classes).eval()
    x, y = data.batch(4, seed=5)
    result, rec, score = _fished_and_rebuilt(model, x, y, input_shape=(3, 32, 32))
    assert result.certifiable_after.all()
    assert rec.num_certified == 4 and score.false_certificates == 0 and int(score.exact.sum()) == 4
    reduced = reduce_exclusivity(model, x, y)
    assert reduced.protected and float(reduced.inputs.min()) >= 0.0 and float(reduced.inputs.max()) <= 1.0
    sent = fedleak.reconstruct(model, _gradient(model, reduced.inputs, reduced.labels), input_shape=(3, 32, 32))
    assert sent.num_certified == 0


CIFAR = fedleak.normalization((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


@pytest.fixture(scope="module")
def normalised_retina():
    """Retina patches normalised per channel before the model (CIFAR-10's statistics), and an MLP class."""
    data = fedleak.load_dataset("retina")
    x, y = data.batch(32, seed=3)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3072, 1024), nn.ReLU(), nn.Linear(1024, 2)).eval()
    return model, CIFAR.apply(x), y


def _outside(normalised: torch.Tensor) -> int:
    """Values outside [0, 1] once the normalised batch is mapped back to pixels."""
    pixels = CIFAR.invert(normalised.double())
    return int(((pixels < -1e-6) | (pixels > 1 + 1e-6)).sum())


def test_data_normalised_per_channel_is_fished_in_pixels_when_its_normalisation_is_told(normalised_retina):
    """One data range (the channels' union) lets fished values leave their own channel's range; told the
    normalisation, fishing moves pixels inside [0, 1] and sends them normalised, an unmoved sample as it was."""
    model, z, y = normalised_retina
    union = fedleak.fish(model, z, y, data_range=CIFAR.input_range)
    assert _outside(union.inputs) > 0
    told = fedleak.fish(model, z, y, normalization=CIFAR)
    assert told.data_range == (0.0, 1.0) and _outside(told.inputs) == 0 and told.certifiable_after.all()
    for s in told.samples:  # sizes in pixels; an unperturbed sample is the very row it was
        moved = CIFAR.invert(told.inputs[s.index:s.index + 1]) - CIFAR.invert(z[s.index:s.index + 1])
        assert s.linf == pytest.approx(float(moved.abs().max()), rel=1e-3, abs=1e-5)
        assert s.perturbed or torch.equal(told.inputs[s.index], z[s.index])
    rec = fedleak.reconstruct(model, _gradient(model, told.inputs, y))
    score = fedleak.metrics.match(rec, told.inputs, y)
    assert rec.num_certified == 32 and score.false_certificates == 0


def test_exclusivity_reduction_of_normalised_data_keeps_every_channel_in_range(normalised_retina):
    model, z, y = normalised_retina
    z, y = z[:8], y[:8]
    assert fedleak.reconstruct(model, _gradient(model, z, y)).num_certified > 0
    defense = DefenseStack.of("exclusivity-reduction").bind(data_range=CIFAR.input_range,
                                                                      normalization=CIFAR).defenses[0]
    assert defense.normalization == CIFAR and defense.data_range == (0.0, 1.0)  # the pixels' range, not the union
    given = DefenseStack((make_defense("exclusivity-reduction", data_range=(-2.5, 2.5)),)).bind(normalization=CIFAR)
    assert given.defenses[0].normalization is None and given.defenses[0].data_range == (-2.5, 2.5)  # as the user said
    sent, labels = defense(model, z, y)
    assert defense.last_result.protected and _outside(sent) == 0
    assert fedleak.reconstruct(model, _gradient(model, sent, labels)).num_certified == 0
