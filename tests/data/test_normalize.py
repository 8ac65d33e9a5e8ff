"""Mean/std-normalised data: the map, the data set that remembers it, and scores in pixel space."""

import numpy as np
import pytest
import torch

import fedleak
from fedleak.data import Normalization, normalization


def test_apply_and_invert_round_trip_and_range():
    norm = normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    x = torch.rand(4, 3, 5, 5, dtype=torch.float64)
    assert torch.allclose(norm.invert(norm.apply(x)), x, atol=1e-12)
    lo, hi = norm.input_range
    z = norm.apply(x)
    assert lo <= float(z.min()) and float(z.max()) <= hi
    assert lo == pytest.approx(-0.485 / 0.229) and hi == pytest.approx((1 - 0.406) / 0.225)


@pytest.mark.parametrize("mean, std, needle", [((0.5,), (0.0,), "positive"), ((0.5, 0.5), (0.5,), "one mean and one std"),
                                              ((float("nan"),), (1.0,), "finite")])
def test_bad_normalisation_is_a_data_error(mean, std, needle):
    with pytest.raises(fedleak.DataError, match=needle):
        Normalization(mean, std)


def test_dataset_normalized_keeps_the_map(digits):
    data = digits.normalized([0.5], [0.5])
    assert data.value_range == (-1.0, 1.0) and data.pixel_range == (0.0, 1.0)
    assert float(data.x.min()) >= -1 and float(data.x.max()) <= 1 and float(data.x.min()) < 0
    assert torch.allclose(data.pixels(data.x), digits.x, atol=1e-6)
    with pytest.raises(fedleak.DataError, match="already normalised"):
        data.normalized([0.5], [0.5])
    with pytest.raises(fedleak.DataError, match="channel"):
        digits.normalized([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])


def test_one_number_normalises_every_channel(digits):
    """``normalized(0.1307, 0.3081)``, as MNIST tutorials write it, is ``normalized((0.1307,), (0.3081,))``;
    text is a DataError, not a TypeError."""
    one = digits.normalized(0.1307, 0.3081)
    assert one.normalization == digits.normalized((0.1307,), (0.3081,)).normalization
    assert torch.equal(one.x, digits.normalized([0.1307], [0.3081]).x)
    assert normalization(0.5, 0.5).input_range == (-1.0, 1.0)
    assert normalization(np.float32(0.5), torch.tensor(0.5)).input_range == (-1.0, 1.0)
    with pytest.raises(fedleak.DataError, match="or one number for every channel"):
        digits.normalized("mean", 0.5)


def test_match_scores_normalised_data_in_pixel_space(digits):
    data = digits.normalized([0.1307], [0.3081])
    x, y = data.x[:6], data.y[:6]
    off = x + 0.01 / data.normalization.std[0]  # 0.01 in pixel units
    m = fedleak.metrics.match(off, x, y, normalization=data.normalization)
    assert m.data_range == (0.0, 1.0)
    assert m.max_abs_error == pytest.approx([0.01] * 6, rel=1e-4)
    assert m.psnr == pytest.approx([40.0] * 6, abs=1e-3)
    # the Dataset carries the map: the same scores without naming it
    sub = fedleak.Dataset("sub", x, y, data.classes, value_range=data.value_range, normalization=data.normalization)
    assert fedleak.metrics.match(off, sub).psnr == pytest.approx(m.psnr)
    with pytest.raises(fedleak.FedleakError, match="either data_range or normalization"):
        fedleak.metrics.match(off, x, y, data_range=(-1, 1), normalization=data.normalization)
