"""Zero padding before a convolution (``nn.ZeroPad2d``, ``F.pad``, ``nn.ConstantPad1d`` with 0), read into that
convolution's own padding, which may differ on the two sides of a dimension (a causal ``Conv1d``, ``padding='same'``
with an even kernel): the exact methods certify what the same model certifies with the padding given to the conv,
read the unrolled conv of unequal sides as torch computes it, and refuse, naming it, padding they cannot read."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from user_models import sized_gradient

import fedleak
from fedleak.errors import ModelError
from fedleak.nets import as_network
from fedleak.nets.conv_solve import band_product


class Padded(nn.Module):
    """Two conv blocks on 8 x 8 digits; ``pad`` pads before each conv (the convs then pad nothing), else the convs pad
    by 1 themselves (the twin)."""

    def __init__(self, pad: str | None) -> None:
        super().__init__()
        self.pad = {"ZeroPad2d": nn.ZeroPad2d(1), "ConstantPad2d": nn.ConstantPad2d(1, 0.0)}.get(pad)
        self.functional = pad == "F.pad"
        own = 0 if pad else 1
        self.conv1 = nn.Conv2d(1, 6, 3, padding=own)
        self.conv2 = nn.Conv2d(6, 32, 3, padding=own)
        self.fc = nn.Linear(32 * 8 * 8, 512)
        self.out = nn.Linear(512, 10)

    def padded(self, a):
        if self.functional:
            return F.pad(a, (1, 1, 1, 1))
        return a if self.pad is None else self.pad(a)

    def forward(self, x):
        a = F.relu(self.conv1(self.padded(x)))
        a = F.relu(self.conv2(self.padded(a)))
        return self.out(F.relu(self.fc(a.flatten(1))))


@pytest.mark.parametrize("pad", ["ZeroPad2d", "F.pad", "ConstantPad2d"])
def test_zero_padding_before_a_conv_certifies_what_the_conv_padding_certifies(digits, pad):
    torch.manual_seed(0)
    model, twin = Padded(pad).eval(), Padded(None).eval()
    twin.load_state_dict(model.state_dict(), strict=False)
    x, y = digits.batch(8, seed=1)
    x = x.reshape(8, 1, 8, 8)
    assert torch.allclose(model(x), twin(x))
    net = as_network(model, input_shape=(1, 8, 8))
    assert [b.conv.padding for b in net.blocks] == [(1, 1), (1, 1)] and net.blocks[0].in_shape == (1, 8, 8)
    rec = fedleak.reconstruct(model, sized_gradient(model, x, y), attack="exclusivity")
    read = fedleak.reconstruct(twin, sized_gradient(twin, x, y), attack="exclusivity")
    assert rec.num_certified >= 4 and rec.certified.tolist() == read.certified.tolist()
    assert torch.equal(rec.inputs, read.inputs)
    assert fedleak.metrics.match(rec, x, y).false_certificates == 0


def test_a_signals_zero_padding_is_read_into_its_conv1d(digits):
    class Signal(nn.Module):
        def __init__(self, pad: bool) -> None:
            super().__init__()
            self.pad = nn.ZeroPad1d(2) if pad else nn.Identity()
            self.conv = nn.Conv1d(1, 8, 5, padding=0 if pad else 2)
            self.fc, self.out = nn.Linear(8 * 64, 256), nn.Linear(256, 10)

        def forward(self, x):
            return self.out(F.relu(self.fc(F.relu(self.conv(self.pad(x.view(x.size(0), 1, 64)))).flatten(1))))

    torch.manual_seed(1)
    model, twin = Signal(True).eval(), Signal(False).eval()
    twin.load_state_dict(model.state_dict())
    x, y = digits.batch(8, seed=2)
    rec = fedleak.reconstruct(model, sized_gradient(model, x, y), attack="exclusivity")
    read = fedleak.reconstruct(twin, sized_gradient(twin, x, y), attack="exclusivity")
    assert rec.num_certified >= 4 and rec.certified.tolist() == read.certified.tolist()
    assert fedleak.metrics.match(rec, x, y).false_certificates == 0


def test_a_dropout_before_the_padding_still_withholds_the_certificates(digits):
    class Dropped(Padded):
        def __init__(self) -> None:
            super().__init__("ZeroPad2d")
            self.drop = nn.Dropout(0.2)

        def forward(self, x):
            return super().forward(self.drop(x))

    torch.manual_seed(2)
    model = Dropped().eval()
    x, y = digits.batch(4, seed=3)
    x = x.reshape(4, 1, 8, 8)
    rec = fedleak.reconstruct(model, sized_gradient(model, x, y), attack="exclusivity")
    assert rec.num_certified == 0 and "Dropout 'drop' (p = 0.2)" in rec.samples[0].reason
    told = fedleak.reconstruct(model, sized_gradient(model, x, y), attack="exclusivity", train_dropout=False)
    assert told.num_certified >= 1


@pytest.mark.parametrize("pad, channels, match", [
    (lambda a: F.pad(a, (1, 1, 1, 1), mode="reflect"), 1, "reflect padding fills the border with copies"),
    (lambda a: F.pad(a, (1, 1, 1, 1), value=1.0), 1, "only zero padding"),
    (lambda a: F.pad(a, (1, 1, 1, 1, 1, 1)), 3, "only padding of the maps' own dimensions"),
])
def test_padding_it_cannot_read_into_a_conv_is_refused_naming_it(pad, channels, match):
    class Other(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(channels, 4, 3)
            self.fc, self.out = nn.Linear(4 * 64, 64), nn.Linear(64, 10)

        def forward(self, x):
            return self.out(F.relu(self.fc(F.relu(self.conv(pad(x))).flatten(1))))

    with pytest.raises(ModelError, match=f"node 'pad' \\(F.pad\\): .*{match}"):
        as_network(Other(), input_shape=(1, 8, 8))


def test_padding_anywhere_but_before_a_conv_is_refused():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.ZeroPad2d(1), nn.Flatten(),
                          nn.Linear(4 * 10 * 10, 32), nn.ReLU(), nn.Linear(32, 10))
    with pytest.raises(ModelError, match=r"node '2' \(Pad\) does not fit here"):
        as_network(model, input_shape=(1, 8, 8))
    with pytest.raises(ModelError, match=r"node '3' \(ZeroPad1d\): only zero padding of \(C, H, W\) maps"):
        as_network(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.ZeroPad1d(1), nn.Linear(34, 10)),
                   input_shape=(1, 8, 8))


class Causal(nn.Module):
    """A causal ``Conv1d`` over digits read as 64-step signals, padded on the left only, then a ``padding='same'`` one
    with an even kernel (torch pads one more zero after than before)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, 6, 4)
        self.conv2 = nn.Conv1d(6, 16, 2, padding="same")
        self.fc, self.out = nn.Linear(16 * 64, 512), nn.Linear(512, 10)

    def forward(self, x):
        a = F.relu(self.conv1(F.pad(x.view(x.size(0), 1, 64), (3, 0))))
        return self.out(F.relu(self.fc(F.relu(self.conv2(a)).flatten(1))))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_unequal_sides_are_read_as_torch_pads_them():
    """The unrolled conv, its transpose and its normal equations' band match torch's padded conv."""
    torch.manual_seed(3)
    model = Causal().eval()
    net = as_network(model, input_shape=(64,))
    assert [(b.conv.geometry.padding, b.conv.geometry.after) for b in net.blocks] == [((0, 3), (0, 0)),
                                                                                       ((0, 0), (0, 1))]
    gen = np.random.default_rng(0)
    for blk in net.blocks:
        A, c = blk.affine
        x, v, w = gen.random(blk.in_dim), gen.random(blk.conv_dim), gen.random(blk.conv_dim)
        z = blk.preact(torch.from_numpy(x)[None]).reshape(-1).numpy()
        assert np.abs(A @ x + c - z).max() < 1e-12 and np.abs(blk.unrolled_times(x) + c - z).max() < 1e-12
        assert np.abs(A.T @ v - blk.unrolled_transpose_times(v)).max() < 1e-12
        normal = (A.T @ A.multiply(w[:, None])).toarray()
        assert np.abs(band_product(blk.gram.band(w), blk.gram.order)(x) - normal @ x).max() < 1e-12


class OneSided(nn.Module):
    """One conv with zeros on one side only: a causal ``Conv1d`` (``F.pad(x, (4, 0))``) over digits read as 64-step
    signals, or a ``Conv2d`` with ``padding='same'`` and a 2 x 2 kernel over the 8 x 8 images."""

    def __init__(self, causal: bool) -> None:
        super().__init__()
        self.causal = causal
        self.conv = nn.Conv1d(1, 16, 5) if causal else nn.Conv2d(1, 16, 2, padding="same")
        self.fc, self.out = nn.Linear(16 * 64, 512), nn.Linear(512, 10)

    def forward(self, x):
        a = self.conv(F.pad(x.view(x.size(0), 1, 64), (4, 0))) if self.causal else self.conv(x.view(-1, 1, 8, 8))
        return self.out(F.relu(self.fc(F.relu(a).flatten(1))))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_a_causal_or_even_same_padded_conv_certifies_samples_none_false(digits, causal):
    torch.manual_seed(4)
    model = OneSided(causal).eval()
    x, y = digits.batch(8, seed=5)
    rec = fedleak.reconstruct(model, sized_gradient(model, x, y), attack="exclusivity")
    score = fedleak.metrics.match(rec, x, y)
    assert rec.num_certified >= 4 and score.false_certificates == 0 and int(score.exact.sum()) >= rec.num_certified


@pytest.mark.parametrize("module, mode", [(nn.ReflectionPad2d(1), "reflect"), (nn.ReplicationPad2d(1), "replicate"),
                                          (nn.CircularPad2d(1), "circular")])
def test_a_padding_module_that_copies_the_border_is_refused_saying_so(module, mode):
    model = nn.Sequential(module, nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 32), nn.ReLU(),
                          nn.Linear(32, 10))
    with pytest.raises(ModelError, match=f"node '0' \\({type(module).__name__}\\): {mode} padding fills the border"):
        as_network(model, input_shape=(1, 8, 8))
