"""The noise a residual update states per entry (peeling), read where it is used: its formula on every entry read,
silent rows zero, and nothing as large as the update held but the residual itself."""

import pytest
import torch

import fedleak
from fedleak.attacks.exact.batch_gradient import SummedProducts, batch_gradient
from fedleak.attacks.exact.options import ExclusivityOptions
from fedleak.attacks.exact.peeling import residual_update
from fedleak.attacks.exact.residual_noise import HELD_ENTRIES, held_terms
from fedleak.nets import as_network

F64 = torch.float64


@pytest.fixture(scope="module")
def peeled(digits):
    """The residual of a batch of 10 of which 4 are taken as certified, its noise, the update and the terms."""
    model = fedleak.make_mlp(digits.input_shape, [64], 10, seed=2)
    x, y = digits.batch(10, seed=4)
    update = fedleak.compute_gradient_update(model, x, y)
    net, keep = as_network(model), torch.arange(10) < 4
    scales = torch.full((4,), 0.1, dtype=F64)
    residual, noise, _ = residual_update(model, net, update, x[keep], y[keep], scales, ExclusivityOptions(), None)
    terms = batch_gradient(model, net, x[keep], y[keep], sample_weights=scales, as_sent=True)
    return update, residual, noise, terms


def test_each_entry_reads_its_formula_and_silent_rows_read_zero(peeled):
    """``rescale (4 eps |g| + 4 eps |t|) + eps/2 |residual|`` (a gradient's own noise is 4 eps |g|), zero on the
    rows peeling silenced (their residual is zero too)."""
    update, residual, noise, terms = peeled
    rescale = 10 / 6  # the mean over the 6 samples left, read off the mean over 10
    silent_rows = 0
    for name, g in update.gradients.items():
        eps = float(torch.finfo(g.dtype).eps)
        t = terms.products(name)[...] if name in terms.sinks else terms.grads[name]
        r = residual.gradients[name].to(F64)
        want = rescale * (4 * eps * g.to(F64).abs() + 4 * eps * t.abs()) + eps / 2 * r.abs()
        got = noise[name].read()
        silent = got.reshape(len(got), -1).abs().amax(1) == 0
        assert bool((r.reshape(len(r), -1)[silent] == 0).all()), name
        assert torch.allclose(got[~silent], want[~silent], rtol=1e-12, atol=0), name
        silent_rows += int(silent.sum())
    assert silent_rows  # (neurons only the four certified samples fire)


def test_rows_columns_pieces_and_norms_read_the_same_entries(peeled):
    _, _, noise, _ = peeled
    for name in ("1.weight", "3.weight"):
        n = noise[name]
        whole = n.read()
        rows, cols = torch.tensor([5, 0, 3]), torch.tensor([2, 7])
        assert torch.allclose(n.rows(rows), whole[rows], rtol=1e-13, atol=0)
        assert torch.allclose(n.rows([1, 2]), whole[[1, 2]], rtol=1e-13, atol=0)
        mask = torch.zeros(len(whole), dtype=torch.bool)
        mask[[1, 5]] = True
        assert torch.allclose(n.rows(mask), whole[mask], rtol=1e-13, atol=0)  # a mask, not row numbers
        assert torch.allclose(n.columns(cols), whole[:, cols], rtol=1e-13, atol=0)
        assert torch.allclose(torch.cat(list(n.pieces())), whole, rtol=1e-13, atol=0)
        assert torch.allclose(n.row_norms(), whole.norm(dim=1), rtol=1e-12, atol=0)
        assert n.on("cpu").values.dtype == torch.float32  # the format the residual's values carry


def test_the_noise_of_a_streamed_weight_holds_no_tensor_of_its_size_but_the_residual(peeled):
    _, residual, noise, _ = peeled
    for name in ("1.weight", "3.weight"):
        lazy = noise[name].values
        assert lazy.residual.data_ptr() == residual.gradients[name].data_ptr()  # the residual itself
        assert isinstance(lazy.terms, SummedProducts)
    lazy = noise["1.weight"].values  # the first layer's terms: 4 samples' signals and inputs
    assert sum(t.numel() for pair in lazy.terms.pairs for t in pair) < lazy.residual.numel() / 4


def test_large_terms_held_whole_are_their_magnitudes_in_float32_rounded_up():
    t = torch.randn(300, 300, dtype=F64, generator=torch.Generator().manual_seed(0)) * 1e-3
    held = held_terms(t)
    assert held.dtype == torch.float32 and t.numel() > HELD_ENTRIES
    assert bool((held.to(F64) >= t.abs()).all())
    assert bool((held.to(F64) - t.abs() <= t.abs() * 2.0**-23).all())  # within one float32 spacing
    small = torch.randn(10, dtype=F64)
    assert held_terms(small) is small
