"""The joint checks of the certificate: a set of rebuilt samples must be explainable together."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedleak.attacks.exact import ExclusivityOptions, HeadAttack, state
from fedleak.attacks.exact.joint import (
    IndependenceTest,
    WitnessConflicts,
    dead_row_contributions,
    degenerate_loss_vectors,
)
from fedleak.attacks.exact.rank_test import JointTest, residual_spectrum, sketch_dtype
from fedleak.nets import as_network, forward_trace
from fedleak.nets.float64 import product32


def mlp(d_in: int, width: int, k: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, k))


def setup(data, idx, width=256, seed=3):
    x, y = data.x[idx].reshape(len(idx), -1), data.y[idx]
    model = mlp(x.shape[1], width, data.num_classes, seed)
    loss = F.cross_entropy(model(x), y)
    grads = dict(zip([n for n, _ in model.named_parameters()],
                     [g.detach() for g in torch.autograd.grad(loss, list(model.parameters()))]))
    attack = HeadAttack(as_network(model).head, grads, ExclusivityOptions(), torch.float32)
    return attack, x, y


def trace(attack, X, labels):
    return forward_trace(attack.net, X.double(), labels, dtype=torch.float64, params=(attack.W, attack.b))


def test_joint_test_accepts_the_batch_and_rejects_a_blend(lfw):
    """The true samples explain the gradient at every rank M - |C|; a same-label blend added to (or put in
    place of) them does not."""
    attack, x, y = setup(lfw, [0, 1, 2, 3, 4])
    same = [i for i in range(5) if y[i] == y[0]]
    a, b = same[0], same[1] if len(same) > 1 else same[0]
    blend = (x[a] + x[b]) / 2
    X = torch.cat([x, blend[None]]).double()
    labels = torch.cat([y, y[a:a + 1]])
    t64 = trace(attack, X, labels)
    test = JointTest(attack, t64, batch_size=5, weights=torch.full((6,), 1 / 5, dtype=torch.float64), slack=5)
    assert test.excess([0, 1, 2, 3, 4]) <= 1e-2  # the whole batch: residual at float32 noise
    assert test.excess([0, 1, 2]) <= 1e-2  # a subset: the rest fills rank 2
    assert test.excess([0, 1, 2, 5]) > 1  # a blend among them
    assert test.excess([5]) > 1  # a blend alone
    assert test.excess([0, 1, 2, 3, 4, 5]) > 1  # more samples than the batch


def test_joint_test_sketches_a_layer_with_more_outputs_than_inputs_from_the_left(digits):
    """A 64-input layer with 512 outputs is sketched on its output side (the residual's Gram is then the small
    one); the true samples still pass and a blend still fails."""
    first = [int(i) for i in torch.nonzero(digits.y == digits.y[0]).flatten()[:2]]
    idx = [first[0], first[1]] + [i for i in range(1, 10) if digits.y[i] != digits.y[0]][:3]
    attack, x, y = setup(digits, idx, width=512, seed=0)
    blend = (x[0] + x[1]) / 2
    t64 = trace(attack, torch.cat([x, blend[None]]), torch.cat([y, y[:1]]))
    test = JointTest(attack, t64, batch_size=5, weights=torch.full((6,), 1 / 5, dtype=torch.float64), slack=5)
    k = 2 * (5 + 1) + 8
    assert test.excess([0, 1, 2, 3, 4]) <= 1e-2 and test.excess([0, 2, 3]) <= 1e-2
    assert test.excess([0, 2, 3, 5]) > 1 and test.excess([5]) > 1
    assert test.sketched(0)[0].shape == (k, 65)  # Omega^T [G | g]: k x (inputs + bias)


def test_a_float32_gradient_is_sketched_in_float32_with_the_float64_sketchs_verdicts(lfw, monkeypatch):
    """A float32 gradient on the CPU is sketched in float32 (by a Gaussian matrix drawn in float32), a float64
    one in float64; the two statistics agree to a small fraction of the threshold, and the same sets pass."""
    attack, x, y = setup(lfw, list(range(12)), width=512)
    dense = attack.net.dense
    grads64 = {d.weight_name: G.double() for d, G in zip(dense, attack.G)}
    grads64.update({d.bias_name: g for d, g in zip(dense, attack.g)})
    attack64 = HeadAttack(attack.net, grads64, ExclusivityOptions(), torch.float64)
    calls = []
    monkeypatch.setattr(state, "product32", lambda A, B: calls.append(A.shape) or product32(A, B))
    assert sketch_dtype(attack.G[0]) == torch.float32 and sketch_dtype(attack64.G[0]) == torch.float64
    same = [i for i in range(12) if y[i] == y[0]]
    blend = (x[same[0]] + x[same[1]]) / 2
    X, labels = torch.cat([x, blend[None]]).double(), torch.cat([y, y[same[0]:same[0] + 1]])
    weights = torch.full((13,), 1 / 12, dtype=torch.float64)
    tests = [JointTest(a, trace(a, X, labels), batch_size=12, weights=weights, slack=12) for a in (attack, attack64)]
    sets = [[0, 1, 2], list(range(8)), [0, 1, 2, 12], [12], list(range(6)) + [12]]
    for members in sets:
        e32, e64 = (t.excess(members) for t in tests)
        assert (e32 <= 1) == (e64 <= 1)
        assert abs(e32 - e64) <= 1e-2 * max(1.0, e64)
    assert tests[0].excess([0, 1, 2]) <= 1e-2 and tests[0].excess([0, 1, 2, 12]) > 1
    assert tests[0].sketched(0)[0].dtype == torch.float64  # the sketch is returned in float64
    n32 = len(calls)
    assert n32 >= 1  # the float32 gradient's sketch was taken in float32 ...
    tests[1].excess([0, 1, 2])
    assert len(calls) == n32  # ... and the float64 one's was not


def test_joint_test_of_the_whole_batch_is_exact_and_takes_no_sketch(lfw, monkeypatch):
    """A set of M samples leaves rank 0: its statistic is the residual's own norm at every layer (no sketch is
    taken), and a blend in place of a sample fails it."""
    attack, x, y = setup(lfw, [0, 1, 2, 3, 4])
    blend = (x[0] + x[1]) / 2  # put in place of sample 0, with its label
    t64 = trace(attack, torch.cat([x, blend[None]]), torch.cat([y, y[:1]]))
    weights = torch.full((6,), 1 / 5, dtype=torch.float64)
    monkeypatch.setattr(attack, "sketch", lambda *a, **k: pytest.fail("the whole batch took a sketch"))
    test = JointTest(attack, t64, batch_size=5, weights=weights, slack=5)
    worst = 0.0
    for i in range(attack.net.depth + 1):
        delta = t64.loss_vectors if i == attack.net.depth else t64.deltas[i]
        O = torch.cat([attack.G[i].double(), attack.g[i].double()[:, None]], 1)
        A = torch.cat([t64.activations[i], torch.ones(6, 1, dtype=torch.float64)], 1)
        R = O - (delta[:5].T * weights[:5]) @ A[:5]
        worst = max(worst, float(R.norm() / O.norm()))
    assert test.residual([0, 1, 2, 3, 4]) == pytest.approx(worst, rel=1e-6)
    assert test.excess([0, 1, 2, 3, 4]) <= 1e-2
    assert test.excess([1, 2, 3, 4, 5]) > 1


def test_dead_rows_refute_a_signed_blend(digits):
    """``x1 + x2 - x0`` fires neurons where none of the three does; rows that are exactly zero show that no
    sample of the batch is there, so its term there refutes it. True samples have no term on dead rows."""
    idx = list(range(6))
    attack, x, y = setup(digits, idx, width=512, seed=0)
    blend = x[1] + x[2] - x[0]
    X = torch.cat([x, blend[None]])
    t64 = trace(attack, X, torch.cat([y, y[1:2]]))
    dead = dead_row_contributions(attack, t64) / 6  # each at the batch's scale, 1/6
    assert float(dead[:6].max()) == 0.0
    assert float(dead[6]) > 1e-5


def test_witness_conflicts_between_a_blend_and_its_constituents(lfw):
    """A blend fires on its constituents' witness rows (and they on its): the pair cannot both be certified."""
    attack, x, y = setup(lfw, [0, 1, 2, 3])
    same = [i for i in range(4) if y[i] == y[0]]
    blend = x[same].mean(0)
    X = torch.cat([x, blend[None]])
    t64 = trace(attack, X, torch.cat([y, y[:1]]))
    z = t64.preactivations[0]
    rows = [torch.nonzero((z[k] > 0) & ((z[torch.arange(5) != k] > 0).sum(0) == 0)).flatten().tolist()[:8]
            for k in range(4)]  # each true sample's exclusive rows (among the four)
    rows.append(torch.nonzero(z[4] > 0).flatten().tolist()[:8])  # the blend claims rows it fires on
    passing = [tuple((0, r, 1e-6) for r in rr) for rr in rows]
    conflicts = WitnessConflicts(attack, passing, torch.full((5,), 1 / 4, dtype=torch.float64))
    conflicts.add(t64, range(5))
    assert conflicts.excess([0, 1, 2, 3]) <= 1.0  # exclusive rows: no other true sample fires there
    assert conflicts.excess([same[0], 4]) > 1.0


def test_independence_refutes_a_blend_of_samples_left_in_the_residual(lfw):
    """A blend of two uncertified samples: the rank test has room for it when silent samples leave rank
    unused, but its input is a combination of inputs the residual still holds, and a true sample's is not."""
    attack, x, y = setup(lfw, [0, 1, 2, 3, 4])
    same = [i for i in range(5) if y[i] == y[0]][:2]
    blend = 0.7 * x[same[0]] + 0.3 * x[same[-1]]
    X = torch.cat([x, blend[None]])
    t64 = trace(attack, X, torch.cat([y, y[:1]]))
    weights = torch.full((6,), 1 / 5, dtype=torch.float64)
    others = [i for i in range(5) if i not in same]
    test = IndependenceTest(attack, t64, batch_size=5, weights=weights, min_distance=1e-3, tested=list(range(6)))
    assert test.excess(others[:1]) <= 1.0  # a true sample: far from the span of the others
    assert test.excess([5]) > 1.0  # the blend: inside the span of its (uncertified) constituents
    assert test.excess(list(range(5))) <= 1.0  # the whole batch: nothing left, nothing to compare with


def test_independence_gives_up_when_the_rest_can_span_everything(digits):
    """64 pixels + bias: with 65 or more samples left in the residual no input can be told from a blend."""
    attack, x, y = setup(digits, list(range(70)), width=256)
    t64 = trace(attack, x, y)
    test = IndependenceTest(attack, t64, batch_size=70, weights=torch.full((70,), 1 / 70, dtype=torch.float64),
                            min_distance=1e-3, tested=[0])
    assert not test.possible([0, 1, 2, 3])
    assert test.excess([0, 1, 2, 3]) > 1.0
    assert test.excess([1, 2, 3]) == 0.0  # sample 0 is the only one tested


def test_degenerate_loss_vectors():
    two = torch.tensor([[0.3, -0.3], [-0.9, 0.9]], dtype=torch.float64)
    assert degenerate_loss_vectors(two, torch.zeros(2, 2, dtype=torch.float64)).all()
    # a plain cross-entropy: p - onehot(1), p saturated at class 0, and p = (0.4, 0.3, 0.2, 0.1)
    logits = torch.tensor([[40.0, 0, 0, 0], [0.4, 0.3, 0.2, 0.1]], dtype=torch.float64)
    logits[1] = logits[1].log()
    p = torch.softmax(logits, 1)
    plain = p - torch.nn.functional.one_hot(torch.tensor([1, 1]), 4).to(p.dtype)
    assert degenerate_loss_vectors(plain, logits).tolist() == [True, False]


def test_degenerate_loss_vectors_under_label_smoothing():
    """Smoothed (s = 0.1), a confident sample's loss vector ``onehot(prediction) - target`` is shared by every
    confident sample of its label and prediction, though its two largest entries hold little of its norm."""
    logits = torch.tensor([[0, 0, 40.0, 0], [0.4, 0.3, 0.2, 0.1]], dtype=torch.float64)
    logits[1] = logits[1].log()
    p = torch.softmax(logits, 1)
    target = 0.9 * torch.nn.functional.one_hot(torch.tensor([2, 1]), 4).to(p.dtype) + 0.1 / 4
    smoothed = p - target
    mags = smoothed[0].abs().sort(descending=True).values
    assert mags[2:].norm() > 1e-3 * smoothed[0].norm()  # not two entries: only the prediction tells
    assert degenerate_loss_vectors(smoothed, logits).tolist() == [True, False]


def test_witness_conflicts_match_their_definition():
    """``Q[k, l]`` is the largest term of sample ``l`` on a witness row of ``k`` over that row's tolerance (built for
    all samples at once; compared with the definition, one sample and row at a time)."""
    import types

    gen = torch.Generator().manual_seed(0)
    f64 = torch.float64
    for depth, n in [(1, 7), (2, 12), (3, 5)]:
        widths = [30, 20, 10][:depth]
        acts = [torch.rand(n, 15, generator=gen, dtype=f64)]
        acts += [torch.relu(torch.randn(n, w, generator=gen, dtype=f64)) for w in widths]
        deltas = [torch.randn(n, w, generator=gen, dtype=f64) for w in widths]
        t64 = types.SimpleNamespace(activations=acts, deltas=deltas,
                                    loss_vectors=torch.randn(n, 4, generator=gen, dtype=f64))
        attack = types.SimpleNamespace(net=types.SimpleNamespace(depth=depth),
                                       g=[None if i % 2 else torch.zeros(1) for i in range(depth + 1)])
        def draw(high: int) -> int:
            return int(torch.randint(high, (1,), generator=gen))

        passing = [tuple((draw(depth), draw(10), float(torch.rand(1, generator=gen)) * 1e-3) for _ in range(draw(6)))
                   for _ in range(n)]
        weights = torch.rand(n, generator=gen, dtype=f64)
        whole = WitnessConflicts(attack, passing, weights)
        whole.add(t64, range(n))
        Q = whole.Q
        expected = torch.zeros(n, n, dtype=f64)
        for k, rows in enumerate(passing):
            for layer, row, tol in rows:
                size = (acts[layer] ** 2).sum(1) + (0.0 if attack.g[layer] is None else 1.0)
                term = deltas[layer][:, row].abs() * size.sqrt()
                if layer == depth - 1:
                    term = term + acts[layer + 1][:, row] * t64.loss_vectors.norm(dim=1)
                for m in range(n):
                    if m != k:
                        expected[k, m] = max(float(expected[k, m]), float(weights[m] * term[m] / tol))
        assert torch.allclose(Q, expected, rtol=1e-12, atol=0)
        assert float(Q.max()) > 0 and float(Q.diagonal().abs().max()) == 0.0
        among = sorted(torch.randperm(n, generator=gen)[: n // 2].tolist())
        blocks = WitnessConflicts(attack, passing, weights, among=among)
        for s in range(0, n, 3):  # the samples' traces a block at a time, as the certificate reads hundreds
            block = range(s, min(s + 3, n))
            blocks.add(types.SimpleNamespace(activations=[a[s : block.stop] for a in acts],
                                             deltas=[d[s : block.stop] for d in deltas],
                                             loss_vectors=t64.loss_vectors[s : block.stop]), block)
        part = blocks.Q
        asked = torch.zeros(n, dtype=torch.bool)
        asked[among] = True
        pairs = asked[:, None] | asked[None, :]  # computed where k or l is asked for, 0 elsewhere
        assert torch.equal(part[pairs], Q[pairs]) and float(part[~pairs].abs().sum()) == 0.0


def test_residual_spectrum_is_that_of_the_residual_on_either_side():
    gen = torch.Generator().manual_seed(5)
    for rows, cols in ((12, 300), (5000, 9)):  # wide: Y Y^T; tall: Y^T Y summed over pieces of rows
        OS = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
        B = torch.randn(rows, 2, generator=gen, dtype=torch.float64)
        C = torch.randn(2, cols, generator=gen, dtype=torch.float64)
        Y = OS - B @ C
        want = torch.linalg.svdvals(Y) ** 2
        got = residual_spectrum(OS, B, C)
        assert got.shape == (min(rows, cols),)
        assert bool((got[:-1] >= got[1:]).all())  # largest first
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-9 * float(want[0]))
