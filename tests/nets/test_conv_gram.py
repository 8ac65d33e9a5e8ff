"""The band assembly of A^T diag(w) A (fedleak.nets.conv_gram) equals the sparse product, for the conv
layouts fedleak parses (padding, stride, rectangular kernels, folded batch norm)."""

import numpy as np
import pytest
import scipy.sparse as sp
from torch import nn

from fedleak.models.convnet import make_convnet
from fedleak.nets import as_network
from fedleak.nets.conv_gram import pixel_major_order


def _dense_from_band(ab: np.ndarray, order: np.ndarray) -> np.ndarray:
    bw, n = ab.shape[0] - 1, ab.shape[1]
    N = np.zeros((n, n))
    for k in range(bw + 1):
        idx = np.arange(n - k)
        N[idx + k, idx] = ab[k, : n - k]
        N[idx, idx + k] = ab[k, : n - k]
    out = np.empty_like(N)
    out[np.ix_(order, order)] = N  # band position p holds the natural index order[p]
    return out


@pytest.mark.parametrize("kwargs", [
    dict(padding=0), dict(padding=1), dict(padding=1, batch_norm=True), dict(kernel=5, padding=2),
])
def test_band_assembly_equals_sparse_product(kwargs):
    net = as_network(make_convnet((2, 9, 11), 3, channels=(3, 4), fc_widths=(8,), seed=1, **kwargs))
    rng = np.random.default_rng(0)
    for blk in net.blocks:
        A, _ = blk.affine
        w = (rng.random(A.shape[0]) < 0.5).astype(float)
        gram = blk.gram
        expected = (A.T @ sp.diags(w) @ A).toarray()
        got = _dense_from_band(gram.band(w), gram.order)
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_strided_rectangular_conv():
    model = nn.Sequential(nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0)), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 5 * 6, 4), nn.ReLU(), nn.Linear(4, 2))
    blk = as_network(model, input_shape=(2, 10, 7)).blocks[0]
    A, _ = blk.affine
    w = np.random.default_rng(1).random(A.shape[0])
    np.testing.assert_allclose(_dense_from_band(blk.gram.band(w), blk.gram.order),
                               (A.T @ sp.diags(w) @ A).toarray(), rtol=1e-12, atol=1e-12)


def test_pixel_major_order():
    order = pixel_major_order((2, 2, 3))
    # position (y, x, c) -> natural index c*6 + y*3 + x
    assert order[:4].tolist() == [0, 6, 1, 7]
    assert sorted(order.tolist()) == list(range(12))
