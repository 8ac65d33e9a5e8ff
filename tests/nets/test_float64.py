"""A layer's matrix (an observed gradient, a model's weights) read in float64 a piece at a time, without a float64
copy of the layer."""

from __future__ import annotations

import contextlib

import pytest
import torch

import fedleak
import fedleak.nets.float64 as float64_module
from fedleak.nets import as_network, blas, forward_trace
from fedleak.nets.float64 import (
    FLAT_PIECE,
    NARROW_ENTRIES,
    PIECE_ENTRIES,
    PIECE_ROWS,
    TORCH_PIECE_ENTRIES,
    back64,
    dot64,
    fit_products64,
    is_gram,
    linear64,
    matmul64,
    misfit64,
    piece_rows,
    product32,
    row_norms64,
    rows64,
    through_numpy,
    times64,
)
from fedleak.nets.forward import backward_signals


def test_pieces_read_the_same_values_as_a_float64_copy():
    gen = torch.Generator().manual_seed(0)
    cols = 300
    G = torch.randn(2 * max(PIECE_ENTRIES // cols, PIECE_ROWS) + 7, cols, generator=gen)  # three pieces, the last short
    G64 = G.double()
    B = torch.randn(cols, 9, generator=gen, dtype=torch.float64)
    assert torch.allclose(times64(G, B), G64 @ B, rtol=1e-12, atol=1e-12)
    for width in (1, 4, 16, 17):  # a narrow product reads smaller pieces (many of them), a wider one larger
        B = torch.randn(cols, width, generator=gen, dtype=torch.float64)
        assert torch.allclose(times64(G, B), G64 @ B, rtol=1e-12, atol=1e-12)
    L = torch.randn(3, G.shape[0], generator=gen, dtype=torch.float64)
    assert torch.allclose(times64(G.T, L.T).T, L @ G64, rtol=1e-12, atol=1e-12)  # a product from the left
    assert torch.allclose(times64(G64, B), G64 @ B, rtol=1e-12, atol=1e-12)  # a float64 layer, as it is
    rows = torch.tensor([5, 0, G.shape[0] - 1])
    assert torch.equal(rows64(G, rows), G64[rows])
    assert torch.allclose(row_norms64(G), G64.norm(dim=1), rtol=1e-14, atol=0)
    assert torch.allclose(row_norms64(G, dim=0), G64.norm(dim=0), rtol=1e-14, atol=0)
    assert row_norms64(G).dtype == torch.float64


def test_products_with_a_narrower_layer_equal_those_with_its_float64_copy():
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(2 * PIECE_ROWS + 5, 50, generator=gen)  # a layer's weight, out x in, float32
    W64 = W.double()
    a = torch.randn(6, 50, generator=gen, dtype=torch.float64)
    d = torch.randn(6, W.shape[0], generator=gen, dtype=torch.float64)
    assert torch.allclose(linear64(a, W), a @ W64.T, rtol=1e-13, atol=1e-13)
    assert linear64(a, W).is_contiguous() and linear64(a, W).dtype == torch.float64
    assert torch.allclose(back64(d, W), d @ W64, rtol=1e-13, atol=1e-13)
    assert torch.allclose(linear64(a, W64), a @ W64.T, rtol=1e-13, atol=1e-13)  # a float64 layer, as it is
    assert torch.allclose(back64(d, W64), d @ W64, rtol=1e-13, atol=1e-13)


def test_pieces_are_small_next_to_the_layer_but_wide_layers_keep_their_rows(monkeypatch):
    monkeypatch.setattr(float64_module, "torch_blas_preferred", lambda: False)
    assert piece_rows(1024, 784) == 128  # an eighth of the layer
    assert piece_rows(256, 784) == 32
    assert piece_rows(10, 784) == 16  # at least 16 rows
    assert piece_rows(4096, 784) == min(PIECE_ENTRIES // 784, 512)
    assert piece_rows(1024, 25088) == PIECE_ROWS  # a wide layer: its other factor is read fewer times
    # a reduction or a narrow product reads pieces that stay in cache, the narrower the product the larger
    assert piece_rows(4096, 784, 0) == piece_rows(4096, 784, 8) == NARROW_ENTRIES // 784
    assert piece_rows(4096, 784, 16) == PIECE_ENTRIES // 16 // 784
    assert piece_rows(4096, 784, 17) == piece_rows(4096, 784)
    assert piece_rows(16, 784, 0) == 8  # at least 8 rows, at most an eighth of the layer
    assert piece_rows(1024, 25088, 0) == PIECE_ROWS  # a row of a wide layer alone fills the cache


def test_products_on_torchs_blas_read_larger_pieces_whatever_their_width(monkeypatch):
    monkeypatch.setattr(float64_module, "torch_blas_preferred", lambda: True)
    for width in (1, 16, 17, 256):
        assert piece_rows(4096, 784, width) == TORCH_PIECE_ENTRIES // 784
        assert piece_rows(256, 784, width) == 32  # at most an eighth of the layer
        assert piece_rows(16, 784, width) == 8
        assert piece_rows(1024, 25088, width) == PIECE_ROWS  # a wide layer as on numpy's BLAS
    assert piece_rows(4096, 784, 0) == NARROW_ENTRIES // 784  # a reduction: no BLAS, the same pieces


def test_a_float64_trace_reads_float32_weights_exactly_as_their_float64_copy():
    net = as_network(fedleak.make_mlp(20, [64, 32], 5, seed=0), input_shape=(20,)).head
    gen = torch.Generator().manual_seed(2)
    X = torch.randn(7, 20, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (7,), generator=gen)
    own = forward_trace(net, X, y, dtype=torch.float64)  # by default: the weights as the model holds them
    assert ("weights", torch.float64) not in net.held  # no float64 copy of the head made (nor kept with it)
    copy = forward_trace(net, X, y, dtype=torch.float64, params=(net.weights(torch.float64), net.biases(torch.float64)))
    for a, b in zip(own.activations + own.deltas + [own.logits], copy.activations + copy.deltas + [copy.logits]):
        assert a.dtype == torch.float64
        assert torch.allclose(a, b, rtol=1e-13, atol=1e-15)


def test_a_trace_of_some_samples_is_theirs_in_the_whole_trace():
    net = as_network(fedleak.make_mlp(20, [64, 32], 5, seed=0), input_shape=(20,)).head
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(9, 20, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (9,), generator=gen)
    whole = forward_trace(net, X, y)
    idx = torch.tensor([1, 4, 8])
    part, alone = whole.samples(idx), forward_trace(net, X[idx], y[idx])
    for a, b, c in zip(part.activations + part.preactivations + part.deltas + [part.logits, part.loss_vectors],
                       whole.activations + whole.preactivations + whole.deltas + [whole.logits, whole.loss_vectors],
                       alone.activations + alone.preactivations + alone.deltas + [alone.logits, alone.loss_vectors]):
        assert torch.equal(a, b[idx]) and torch.allclose(a, c, rtol=1e-12, atol=1e-14)
    assert forward_trace(net, X).samples(idx).deltas is None


def test_backward_signals_read_the_relu_masks_alike_from_pre_activations_or_activations():
    """The certificate frees a trace's pre-activations and takes the ReLU masks from the activations: the
    backward signals are the same to the bit (float64 and float32)."""
    net = as_network(fedleak.make_mlp(20, [64, 32], 5, seed=0), input_shape=(20,)).head
    gen = torch.Generator().manual_seed(4)
    X = torch.randn(9, 20, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (9,), generator=gen)
    e = torch.randn(9, 5, generator=gen, dtype=torch.float64)
    for dtype in (torch.float64, torch.float32):
        t = forward_trace(net, X.to(dtype), y, dtype=dtype)
        weights = net.weights(dtype)
        by_pre = backward_signals(weights, t.preactivations, e.to(dtype))
        by_act = backward_signals(weights, t.activations[1:], e.to(dtype))
        assert all(torch.equal(a, b) for a, b in zip(by_pre, by_act))
        assert any(bool((z == 0).any()) or bool((z < 0).any()) for z in t.preactivations)  # masks that cut


@pytest.mark.parametrize("torch_preferred", [False, True])
def test_products_on_either_blas_are_equal_and_autograd_stays_with_torch(monkeypatch, torch_preferred):
    """Whichever BLAS this CPU prefers takes the product (a Gram product ``A A^T`` always numpy's, which takes it as
    one syrk); the values agree to rounding either way, and autograd's tensors stay with torch."""
    monkeypatch.setattr(float64_module, "torch_blas_preferred", lambda: torch_preferred)
    gen = torch.Generator().manual_seed(3)
    A = torch.randn(40, 30, generator=gen, dtype=torch.float64)
    B = torch.randn(30, 7, generator=gen, dtype=torch.float64)
    assert through_numpy(A, B) is not torch_preferred
    assert torch.allclose(matmul64(A, B), A @ B, rtol=1e-13, atol=1e-13)
    out = torch.full((40, 7), float("nan"), dtype=torch.float64)
    assert matmul64(A, B.T.contiguous().T, out) is out  # a transposed factor, written into ``out``
    assert torch.allclose(out, A @ B, rtol=1e-13, atol=1e-13)
    W = torch.randn(40, 9, generator=gen)  # float32, read in pieces: each piece's product summed in float64
    assert torch.allclose(back64(A.T.contiguous(), W), A.T @ W.double(), rtol=1e-12, atol=1e-12)
    assert torch.allclose(times64(W, B[:9]), W.double() @ B[:9], rtol=1e-13, atol=1e-13)
    # a Gram product: numpy's syrk on either CPU, also for a row slice; B.T of another matrix is no Gram product
    assert is_gram(A, A.T) and is_gram(A[5:20], A[5:20].T)
    assert not is_gram(A, A.T.contiguous()) and not is_gram(A[:20], A[5:25].T) and not is_gram(A, B)
    assert through_numpy(A, A.T, gram=True)
    assert torch.allclose(matmul64(A, A.T), A @ A.T, rtol=1e-13, atol=1e-13)
    # a tensor that autograd tracks is multiplied by torch, and its gradient flows
    leaf = A.clone().requires_grad_(True)
    assert not through_numpy(leaf, B) and not through_numpy(leaf, leaf.T, gram=True)
    matmul64(leaf, B).sum().backward()
    assert torch.allclose(leaf.grad, B.sum(1).expand(40, -1))
    with torch.no_grad():  # nothing to record: the preferred BLAS, also for a tensor that requires a gradient
        assert through_numpy(leaf, B) is not torch_preferred
        assert torch.allclose(matmul64(leaf, B), A @ B, rtol=1e-13, atol=1e-13)


def test_the_blas_choice_follows_the_cpu(monkeypatch):
    """torch's BLAS (MKL) on an Intel CPU, numpy's elsewhere; the CPU read from /proc/cpuinfo where there is one."""
    import os

    from fedleak.nets import blas

    if os.path.exists("/proc/cpuinfo"):
        assert blas.cpu_field("vendor_id") and blas.cpu_model()
    assert blas.cpu_field("no such field") == ""
    for vendor, mkl, preferred in (("GenuineIntel", True, True), ("AuthenticAMD", True, False),
                                   ("GenuineIntel", False, False)):
        monkeypatch.setattr(blas, "cpu_field", lambda name, v=vendor: v if name == "vendor_id" else "")
        monkeypatch.setattr(torch.backends.mkl, "is_available", lambda m=mkl: m)
        blas.torch_blas_preferred.cache_clear()
        assert blas.torch_blas_preferred() is preferred
    blas.torch_blas_preferred.cache_clear()


@pytest.mark.parametrize("torch_preferred", [False, True])
def test_a_float32_product_is_within_float32_rounding_of_the_exact_one(monkeypatch, torch_preferred):
    """``product32`` takes the product in IEEE float32 and returns it in float64: within the deterministic bound
    ``n u |A| |B|`` of the exact product, on either BLAS; on torch's only where its float32 matmul is IEEE."""
    gen = torch.Generator().manual_seed(5)
    A = torch.randn(50, 600, generator=gen).T  # a transposed factor, as a left sketch takes it
    B = torch.randn(50, 33, generator=gen)
    monkeypatch.setattr(float64_module, "torch_blas_preferred", lambda: torch_preferred)
    used = []
    matmul = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: used.append(a.shape) or matmul(a, b))
    P = product32(A, B)
    assert bool(used) is torch_preferred
    exact = A.double() @ B.double()
    assert P.dtype == torch.float64 and P.shape == (600, 33)
    bound = 50 * torch.finfo(torch.float32).eps / 2 * (A.double().abs() @ B.double().abs())
    assert bool(((P - exact).abs() <= bound).all())
    assert float((P - exact).abs().max()) > 0  # the sum was taken in float32, not in float64
    used.clear()
    with fp32_precision(torch.backends.mkldnn.matmul, "bf16"):  # torch's float32 matmul rounds to bfloat16 ...
        P = product32(A, B)
    assert torch.equal(P, torch.from_numpy((A.numpy() @ B.numpy())).double()) and not used  # ... numpy's BLAS


@contextlib.contextmanager
def fp32_precision(backend, setting: str):
    """torch's ``fp32_precision`` setting of ``backend`` (a property: set and restored, not monkeypatched)."""
    before = backend.fp32_precision
    backend.fp32_precision = setting
    try:
        yield
    finally:
        backend.fp32_precision = before


def test_ieee_float32_matmul_reads_torchs_settings():
    assert blas.ieee_float32_matmul()  # torch's default
    for setting, ieee in (("ieee", True), ("bf16", False), ("tf32", False)):
        with fp32_precision(torch.backends.mkldnn.matmul, setting):
            assert blas.ieee_float32_matmul() is ieee
    with fp32_precision(torch.backends, "bf16"):  # the global setting decides where the backend's is "none"
        assert not blas.ieee_float32_matmul()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_flat_products_read_piece_by_piece_equal_those_of_float64_copies(dtype):
    gen = torch.Generator().manual_seed(3)
    n = 2 * FLAT_PIECE + 17  # pieces of every length, the last one short
    t = torch.randn(n, generator=gen).to(dtype)
    g = (t.double() * 1.01 + 1e-3 * torch.randn(n, generator=gen, dtype=torch.float64)).to(dtype)
    T, G = t.double(), g.double()
    assert dot64(t, g) == pytest.approx(float(T @ G), rel=1e-13)
    assert dot64(t, t) == pytest.approx(float(T @ T), rel=1e-13)
    assert misfit64(t, g, 0.99) == pytest.approx(float((T - 0.99 * G).norm()), rel=1e-12)
    cut = lambda q: q.clamp(-0.5, 0.5)  # noqa: E731 (a clip, applied to the scaled piece)
    assert misfit64(t, g, 0.99, cut) == pytest.approx(float((T - (0.99 * G).clamp(-0.5, 0.5)).norm()), rel=1e-12)
    assert torch.equal(t, T.to(dtype)) and torch.equal(g, G.to(dtype))  # the vectors themselves are left as they were


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_one_pass_gives_a_fits_products_and_a_residual_bound_at_any_scale(dtype):
    gen = torch.Generator().manual_seed(4)
    n = 2 * FLAT_PIECE + 17
    g = torch.randn(n, generator=gen).to(dtype)
    t = (0.37 * g.double() + 1e-6 * torch.randn(n, generator=gen, dtype=torch.float64)).to(dtype)  # a close fit
    T, G = t.double(), g.double()
    s0 = 0.3701  # a trial scale near the fit's
    p = fit_products64(t, g, s0)
    R = T - s0 * G
    assert p.n == n
    assert p.tt == pytest.approx(float(T @ T), rel=1e-13) and p.gg == pytest.approx(float(G @ G), rel=1e-13)
    assert p.tg == pytest.approx(float(T @ G), rel=1e-12)
    assert p.rr == pytest.approx(float(R @ R), rel=1e-12) and p.rg == pytest.approx(float(R @ G), rel=1e-9, abs=1e-9)
    best = p.tg / p.gg
    for scale in (best, s0, best * (1 + 1e-3), 2.0, -1.0):  # near the trial scale, and far from it
        exact = float((T - scale * G).norm())
        bound = p.misfit(s0, scale)
        assert exact <= bound * (1 + 1e-15)  # never below the residual
        if abs(scale - s0) <= 1e-3 * abs(scale):  # and, near the trial scale, that residual (to its rounding)
            assert bound <= exact * (1 + 1e-6) + 1e-13 * float(T.norm())
    assert fit_products64(t, g, 0.0).rr == pytest.approx(float(T @ T), rel=1e-13)  # no trial: r is t
    assert torch.equal(t, T.to(dtype)) and torch.equal(g, G.to(dtype))
