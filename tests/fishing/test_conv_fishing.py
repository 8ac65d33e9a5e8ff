"""Fishing for CNNs (fedleak.fishing.conv) on real data: fished batches of 32 are certified by the conv attack."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fedleak
from fedleak.errors import ModelError
from fedleak.fishing import FishingTransform
from fedleak.fishing.conv import _ConvStack, _SampleNet, fish_cnn
from fedleak.fishing.lp import NetArrays
from fedleak.models.convnet import as_relu_cnn, make_convnet

CONFIG = dict(channels=(6, 32), kernel=3, padding=1, pool=None, fc_widths=(512,), seed=0)


def _attack(model, inputs, labels):
    return fedleak.reconstruct(model, fedleak.compute_gradient_update(model, inputs, labels))


@pytest.fixture(scope="module")
def lfw():
    return fedleak.load_dataset("lfw")


@pytest.mark.parametrize("pool", [None, "avg"])
def test_linearised_rows_match_the_real_network(lfw, pool):
    """Inside the sample's region the rows/offsets reproduce every conv and head pre-activation."""
    model = make_convnet(lfw.input_shape, 2, channels=(4, 8), kernel=3, padding=1, pool=pool, fc_widths=(32, 16))
    net = as_relu_cnn(model)
    sn = _SampleNet(_ConvStack(net), NetArrays(net.head))
    x, _ = lfw.batch(1, seed=5)
    x0 = x.reshape(-1).double().numpy()
    z = sn.preacts(x0)
    pattern = [(zz > 0).astype(np.float64) for zz in z]
    off = sn.offsets(pattern)
    dx = np.random.default_rng(0).normal(size=x0.shape) * 1e-7
    z2 = sn.preacts(x0 + dx)
    assert len(z) == 4
    for layer in range(len(z)):
        idx = np.array([0, 3, len(z[layer]) - 1])
        R = sn.rows(layer, idx, pattern)
        np.testing.assert_allclose(R @ x0 + off[layer][idx], z[layer][idx], atol=1e-10)
        np.testing.assert_allclose(R @ dx, z2[layer][idx] - z[layer][idx], atol=1e-12)


def test_max_pooling_is_refused(lfw):
    model = make_convnet(lfw.input_shape, 2, channels=(4, 8), pool="max", fc_widths=(32,))
    x, y = lfw.batch(2, seed=0)
    with pytest.raises(ModelError, match="max pooling"):
        fish_cnn(model, x, y)


def test_fish_dispatches_cnns_and_the_transform_reports(lfw):
    model = make_convnet(lfw.input_shape, 2, channels=(4, 8), kernel=3, padding=1, fc_widths=(128,))
    x, y = lfw.batch(6, seed=2)
    res = fedleak.fish(model, x, y)
    assert res.batch_size == 6 and res.inputs.shape == x.shape
    assert float(res.inputs.min()) >= 0.0 and float(res.inputs.max()) <= 1.0
    hook = FishingTransform(margin=0.02)
    xf, yf = hook(model, x, y)
    assert torch.equal(yf, y) and torch.equal(xf, res.inputs)  # deterministic
    assert hook.last_result.to_dict()["batch_size"] == 6


@pytest.mark.parametrize("name,batch", [("lfw", 32), ("fashion-mnist", 32), ("mni152", 16)])
def test_fished_cnn_batch_is_certified_and_exact(name, batch, lfw, fashion):
    """>= 90 % certified and exact against the sent batch, no false certificate (natural batches of this
    model certify far fewer: docs/cnn.md, "Benchmark"). MNI152 brain MRI slices are the medical case."""
    if name == "mni152":
        pytest.importorskip("nilearn")  # the `medical` extra (installed by `make test`)
    data = {"lfw": lfw, "fashion-mnist": fashion}.get(name) or fedleak.load_dataset(name)
    x, y = data.batch(batch, seed=0)
    model = make_convnet(data.input_shape, data.num_classes, **CONFIG)
    res = fish_cnn(model, x, y, solve_check=False)  # the attack below is the real check
    xf = res.inputs
    assert xf.shape == x.shape and xf.dtype == x.dtype
    assert float(xf.min()) >= 0.0 and float(xf.max()) <= 1.0
    linf = (xf - x).abs().amax(dim=tuple(range(1, x.ndim)))
    np.testing.assert_allclose(res.linf, linf.double().numpy(), atol=1e-7)
    assert 0 < float(linf.max()) < 0.3
    for s in res.samples:  # an unperturbed sample says why
        if s.status != "fished":
            assert s.message and float(linf[s.index]) == 0.0
    assert res.certifiable_after.mean() >= 0.9  # head condition in float32
    scored = fedleak.metrics.match(_attack(model, xf, y), xf, y)
    assert not scored.false_certificate.any()
    assert scored.recovered_fraction >= 0.9  # certified, right label and max abs error < 1e-4 vs the sent batch
    assert np.all(scored.max_abs_error[scored.certified] < 1e-4)
