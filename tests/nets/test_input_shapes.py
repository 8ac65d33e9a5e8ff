"""One input's shape, found by running the model: its first layer with weights gives it."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fedleak.errors import ModelError
from fedleak.nets.input_shapes import held_first_layer, most_halved, probe, untraced_input_shape


class HeadFirst(nn.Module):
    """Its head is set before its conv, so the first layer it holds is not the first it calls."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4 * 6 * 6, 3)
        self.conv = nn.Conv2d(2, 4, 3)

    def forward(self, x):
        if x.sum() > 0:  # no graph holds it
            x = x * 1.0
        return self.fc(F.relu(self.conv(x)).flatten(1))


class ConvFirst(HeadFirst):
    def __init__(self) -> None:
        nn.Module.__init__(self)
        self.conv = nn.Conv2d(2, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 3)


def test_a_conv_first_gives_its_channels_and_the_image_that_runs():
    shape, notes, caveats = untraced_input_shape(ConvFirst())
    assert shape == (2, 8, 8) and "the only size that fits" in notes[0] and caveats == ()
    assert probe(ConvFirst(), None, shape) is None and probe(ConvFirst(), None, (2, 9, 9)) is not None


@pytest.mark.parametrize(("low", "high", "size"), [(27, 28, 28), (32, 35, 32), (221, 224, 224), (7, 8, 8),
                                                  (9, 11, 10), (5, 5, 5), (1, 3, 2)])
def test_of_the_sizes_that_fit_the_one_the_most_halvings_divide_is_taken(low, high, size):
    """28 of 27-28 (a 3x3 convolution of stride 2 and padding 1), 32 of 32-35 (two 2x2 poolings), 224 of 221-224
    (ResNet's stem: a 7x7 convolution of stride 2 and a 3x3 pooling of stride 2); ties go to the smaller size."""
    assert most_halved(low, high) == size


class StridedStem(nn.Module):
    """A frozen strided stem, as a ResNet starts: 27 and 28 pixels a side both give 14 x 14 maps."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4 * 14 * 14, 10)

    def forward(self, x):
        return self.fc(F.relu(self.stem(x)).flatten(1))


def test_a_strided_stem_gives_the_image_its_stride_halves():
    """The stride rounds 27 up to the 14 rows that 28 gives: 28 x 28 is taken (the optimisation attacks on a
    Fashion-MNIST model rebuilt 27 x 27 images before), and the note and caveat name both sizes."""
    shape, notes, caveats = untraced_input_shape(StridedStem())
    assert shape == (1, 28, 28)
    assert "27 to 28 pixels a side fit, and 28 is the one" in notes[0]
    assert "(1, 28, 28) inferred" in caveats[0]


def test_the_first_layer_held_is_checked_by_running_the_model():
    model = HeadFirst()
    assert held_first_layer(model)[0] == "fc"
    with pytest.raises(ModelError, match=r"shape \(144,\), which its first layer 'fc' suggests .*pass input_shape="):
        untraced_input_shape(model)


def test_a_model_without_weights_asks_for_the_shape():
    with pytest.raises(ModelError, match="no layer of the model says the shape of its input.*pass input_shape="):
        untraced_input_shape(nn.Sequential(nn.ReLU()))


def test_a_product_with_a_parameter_first_asks_for_the_shape_and_a_learned_scale_does_not():
    from fedleak.nets import input_shape_of

    class Product(nn.Module):  # its first layer is a matmul: the Linear layer after it does not say the input's width
        def __init__(self) -> None:
            super().__init__()
            self.W1 = nn.Parameter(torch.randn(32, 64))
            self.fc = nn.Linear(32, 10)

        def forward(self, x):
            return self.fc(torch.relu(x.flatten(1) @ self.W1.T))

    class Scaled(nn.Module):  # a learned scale of the input, then the first layer: that layer says it
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            return self.fc(x.flatten(1) * self.scale)

    with pytest.raises(ModelError, match=r"first op that reads a parameter is a product such as x @ self\.W\.T"):
        input_shape_of(Product())
    assert input_shape_of(Product(), input_shape=(1, 8, 8))[0] == (1, 8, 8)
    assert input_shape_of(Scaled())[0] == (64,)


def test_probing_leaves_batch_norm_statistics_as_they_were():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).train()
    before = model[1].running_mean.clone()
    assert probe(model, None, (4,)) is None and torch.equal(model[1].running_mean, before)
