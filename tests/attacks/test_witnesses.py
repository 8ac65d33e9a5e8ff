"""Step 1 of the certificate: a witness row's dot products and residual, read from per-row scalars and the
observed row, equal those of the explicit per-sample gradient vectors; and how precisely a rebuilt input is known
from its witness rows (:func:`~fedleak.attacks.exact.witnesses.input_uncertainty`)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedleak.attacks.exact import ExclusivityOptions, HeadAttack
from fedleak.attacks.exact.noise import RoundingNoise
from fedleak.attacks.exact.witnesses import LabelSignals, Signals, WitnessBlock, WitnessFit, input_uncertainty
from fedleak.nets import as_network, forward_trace
from fedleak.nets.forward import backward_signals

F64 = torch.float64


def explicit(t_acts, deltas, e, G, g, Gout, i, own, rows, top):
    """The witness vectors [d a, d, h e] and observed rows [G_j, g_j, Gout[:, j]], one row per witness."""
    d = deltas[i][own, rows][:, None]
    p = [d * t_acts[i][own], d]
    o = [G[rows].to(F64), g[rows, None].to(F64)]
    if top:
        p.append(t_acts[i + 1][own, rows][:, None] * e[own])
        o.append(Gout[:, rows].T.to(F64))
    return torch.cat(p, 1), torch.cat(o, 1)


def two_layer_attack() -> tuple[HeadAttack, torch.Tensor, torch.Tensor]:
    """The head attack's state on a batch of 6 through an MLP of two hidden layers, with the batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 5))
    x, y = torch.randn(6, 20), torch.tensor([0, 1, 2, 3, 4, 0])
    loss = F.cross_entropy(model(x), y)
    grads = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))
    return HeadAttack(as_network(model).head, grads, ExclusivityOptions(), torch.float32), x, y


@pytest.mark.parametrize("layer", [0, 1])
def test_witness_block_equals_the_explicit_vectors(layer):
    attack, x, y = two_layer_attack()
    X, labels = x[:3].double(), y[:3]
    t64 = forward_trace(attack.net, X, labels, dtype=F64, params=(attack.W, attack.b))
    gen = torch.Generator().manual_seed(1)

    def nudge(t):  # a stand-in for the label-entry signals and the float32 replay: any values will do
        return t + 1e-3 * torch.randn(t.shape, generator=gen, dtype=F64)

    # the group: samples 2 and 0 of the trace, in that order; its signals have one row per member
    members = torch.tensor([2, 0])
    onehot = F.one_hot(labels[members], 5).to(F64)
    sig = Signals(t64, members, [nudge(d[members]) for d in t64.deltas], onehot,
                  [nudge(a[members]) for a in t64.activations], [nudge(d[members]) for d in t64.deltas],
                  nudge(t64.loss_vectors[members]))

    def whole(part):  # the group's rows of a signal, laid out as the trace's (zeros elsewhere)
        full = torch.zeros(len(X), *part.shape[1:], dtype=part.dtype)
        full[members] = part
        return full

    own, rows = torch.tensor([0, 0, 1, 1, 1]), torch.tensor([3, 7, 7, 1, 20])  # by place in the group
    top = layer == attack.net.depth - 1
    block = WitnessBlock.of(attack, sig, layer, own, rows)
    at = members[own]  # by the trace's numbering
    p0, o = explicit(t64.activations, t64.deltas, t64.loss_vectors, attack.G[layer], attack.g[layer], attack.G[-1],
                     layer, at, rows, top)
    p1, _ = explicit(t64.activations, [whole(d) for d in sig.d_one], whole(sig.onehot), attack.G[layer],
                     attack.g[layer], attack.G[-1], layer, at, rows, top)
    p32, _ = explicit([whole(a) for a in sig.acts32], [whole(d) for d in sig.d32], whole(sig.e32), attack.G[layer],
                      attack.g[layer], attack.G[-1], layer, at, rows, top)
    for got, want in [(block.p00, (p0 * p0).sum(1)), (block.p01, (p0 * p1).sum(1)), (block.p11, (p1 * p1).sum(1)),
                      (block.p0o, (p0 * o).sum(1)), (block.p1o, (p1 * o).sum(1)), (block.oo, (o * o).sum(1)),
                      (block.noise, (p32 - p0).norm(dim=1))]:
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-14 * float(want.abs().max()))
    s, t = torch.tensor([0.5, -1.0, 2.0, 0.1, 3.0], dtype=F64), torch.tensor([0.0, 1e-3, -2.0, 0.5, 1.0], dtype=F64)
    want = (o - s[:, None] * p0 - t[:, None] * p1).norm(dim=1)
    assert torch.allclose(block.residuals(s, t), want, rtol=1e-12)


def test_label_signals_are_the_same_made_once_or_per_set(monkeypatch):
    """The label entry's backward signals are made once for all candidates where they are small next to the
    gradient, else for each set asked for: the same values to the bit either way."""
    attack, x, y = two_layer_attack()
    t64 = forward_trace(attack.net, x.double(), y, dtype=F64, params=(attack.W, attack.b))
    monkeypatch.setattr(attack, "update_size", lambda: 1 << 30)  # a large gradient: made once for all
    once = LabelSignals(attack, t64, y)
    monkeypatch.setattr(attack, "update_size", lambda: 0)  # every set is then made on its own
    per_set = LabelSignals(attack, t64, y)
    assert once.whole is not None and per_set.whole is None
    idx = torch.tensor([4, 1, 2])
    (d_a, h_a), (d_b, h_b) = once.of(idx), per_set.of(idx)
    assert torch.equal(h_a, h_b) and torch.equal(h_a, F.one_hot(y[idx], 5).to(F64))
    assert all(torch.equal(a, b) for a, b in zip(d_a, d_b))
    assert all(torch.equal(a, d[idx]) for a, d in zip(d_a, backward_signals(attack.W, t64.preactivations,
                                                                             F.one_hot(y, 5).to(F64))))


def rounded_layer(G: torch.Tensor, g: torch.Tensor) -> SimpleNamespace:
    """A first layer of weight rows ``G`` and bias entries ``g``, each entry rounded as float32 rounds it, as the
    certificate's precision check reads it."""
    eps = torch.finfo(torch.float32).eps
    return SimpleNamespace(G=[G], g=[g], noise=[RoundingNoise.of(G, 1.0)], noise_b=[g.abs() * eps])


def witnessed_by(rows: int) -> WitnessFit:
    return WitnessFit(scale=1.0, eps=0.0, residual=0.0, counts=(rows,), noisy_rows=0, consistent=True,
                      passing=tuple((0, j, 0.0) for j in range(rows)))


def test_witness_rows_that_agree_leave_the_input_known_to_their_rounding():
    x = torch.rand(64, generator=torch.Generator().manual_seed(0), dtype=F64)
    g = torch.tensor([2.0, 1.0, 0.5], dtype=F64)
    assert input_uncertainty(rounded_layer((g[:, None] * x).float(), g), witnessed_by(3), x) < 1e-6


def test_a_witness_row_off_the_others_leaves_the_input_known_no_closer_than_it_disagrees():
    """A row with more noise than it states (a peeling residual's row holding an earlier round's error) pulls the
    rows' mean off the sample: the input is known no closer than that row disagrees with it beyond its rounding."""
    x = torch.rand(64, generator=torch.Generator().manual_seed(0), dtype=F64)
    g = torch.tensor([2.0, 1.0], dtype=F64)
    off = torch.zeros(64, dtype=F64)
    off[7] = 1e-4
    G = torch.stack([g[0] * x, g[1] * (x + off)]).float()
    mean = (g[0] ** 2 * x + g[1] ** 2 * (x + off)) / (g**2).sum()  # what the rows' g^2-weighted mean reads
    assert input_uncertainty(rounded_layer(G, g), witnessed_by(2), mean) >= 0.75e-4  # 0.8e-4 off the mean
