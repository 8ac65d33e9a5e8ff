"""The walk-down's least-squares solve of a layer (``forward_solve``): it rebuilds an input its layer's active
outputs determine, refuses an inconsistent system cheaply (a lower bound on its residual from one LU, then, near
the tolerance, the residual of a QR solve), and is not run for candidates whose scale already rules them out
(two-class blends), with the same results."""

from __future__ import annotations

import pytest
import torch

import fedleak
from fedleak.attacks.exact import ExclusivityOptions, HeadAttack, settle, walkdown
from fedleak.attacks.exact.candidates import Candidate
from fedleak.nets import as_network


def one_sample_layer(lfw):
    """A 625-2048-256-2 MLP, one LFW face, and its attack state: the face's input is what the first layer's
    ~1,000 active outputs (of 2048) determine. The proven error bound of a float32 output through this layer
    is 4e-5 of the input, so the solve is allowed that much (``solve_max_error``; 1e-6 by default)."""
    model = fedleak.make_mlp(lfw.input_shape, [2048, 256], 2, seed=0)
    x, y = lfw.batch(1, seed=3)
    grads = dict(fedleak.compute_gradient_update(model, x, y).gradients)
    attack = HeadAttack(as_network(model).head, grads, ExclusivityOptions(solve_max_error=1e-4), torch.float32)
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    with torch.no_grad():
        h = torch.relu(x.flatten(1).double() @ first.weight.double().T + first.bias.double())[0]
    return attack, x.flatten().double(), int(y), h


def test_a_determined_input_is_solved_and_an_inconsistent_one_refused(lfw):
    attack, x, label, h = one_sample_layer(lfw)
    assert int((h > 0).sum()) >= x.numel()
    c = Candidate(label=label, acts={1: h}, witnesses={1: []}, lowest=1)
    a = walkdown.solve_layer(attack, c, 0)
    assert a is not None and float((a - x).abs().max()) <= 1e-6 * float(x.abs().max())
    # the same active outputs, 1% off: no input reproduces them, and the solve says so
    noisy = h * (1 + 0.01 * torch.randn(h.shape, generator=torch.Generator().manual_seed(0), dtype=h.dtype))
    c = Candidate(label=label, acts={1: noisy}, witnesses={1: []}, lowest=1)
    assert walkdown.solve_layer(attack, c, 0) is None


def test_a_system_near_the_tolerance_is_refused_by_its_whole_residual_before_the_svd(lfw, monkeypatch):
    """Outputs 5e-5 off (relative, random): the LU floor on 64 spare rows stays below twice the tolerance, but
    the whole system's least-squares residual (3e-5) exceeds it: a QR solve refuses the system, and the SVD that
    an accepted system needs is not taken. The exact outputs are still solved (through the SVD)."""
    attack, x, label, h = one_sample_layer(lfw)
    drivers = []
    lstsq = torch.linalg.lstsq

    def logged(A, B, driver=None):
        drivers.append(driver)
        return lstsq(A, B, driver=driver)

    monkeypatch.setattr(torch.linalg, "lstsq", logged)
    noisy = h * (1 + 5e-5 * torch.randn(h.shape, generator=torch.Generator().manual_seed(0), dtype=h.dtype))
    active = noisy > 0
    floor = walkdown.residual_floor(attack.W[0][active].double(), noisy[active] - attack.b[0][active])
    assert attack.opts.forward_tol / 4 < floor <= 2 * attack.opts.forward_tol  # the floor alone cannot refuse it
    assert walkdown.solve_layer(attack, Candidate(label=label, acts={1: noisy}, witnesses={1: []}, lowest=1), 0) is None
    assert drivers == ["gels"]
    drivers.clear()
    assert walkdown.solve_layer(attack, Candidate(label=label, acts={1: h}, witnesses={1: []}, lowest=1), 0) is not None
    assert drivers[-1] == "gelsd"


def test_blends_ruled_out_by_their_scale_are_not_solved_for(monkeypatch, lfw):
    """Two-class LFW, two hidden layers: most blends of samples at the top layer find no exclusive row below,
    and each was solved for (an SVD of the layer) and failed. Settled by their scale first, they are not; the
    results are the same."""
    model = fedleak.make_mlp(lfw.input_shape, [768, 512], 2, seed=0)
    x, y = lfw.batch(8, seed=8)
    grads = dict(fedleak.compute_gradient_update(model, x, y).gradients)
    calls = []
    real = walkdown.solve_layer

    def counted(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(walkdown, "solve_layer", counted)
    rec = fedleak.reconstruct(model, grads)
    fewer = len(calls)
    calls.clear()
    with monkeypatch.context() as m:
        m.setattr(settle, "SETTLE", float("inf"))
        full = fedleak.reconstruct(model, grads)
    assert fewer < len(calls) / 2
    assert torch.equal(rec.certified, full.certified) and torch.equal(rec.inputs, full.inputs)
    assert any("were not solved for" in n for n in rec.notes)
    assert fedleak.metrics.match(rec, x, y).false_certificates == 0


def test_residual_floor_bounds_the_least_squares_residual_from_below():
    """The LU bound that refuses inconsistent systems before the SVD: never above the least-squares residual
    (so a system the SVD would accept is never refused), about zero for a consistent system, rank-deficient
    ones included, and far from zero for a random right-hand side, on a subsystem of a much taller one too."""
    gen = torch.Generator().manual_seed(0)
    for m, n in [(650, 625), (80, 20), (50, 49), (400, 50)]:  # the last bounded on a subsystem
        A = torch.randn(m, n, generator=gen, dtype=torch.float64)
        a = torch.randn(n, generator=gen, dtype=torch.float64)
        assert walkdown.residual_floor(A, A @ a) <= 1e-12
        r = torch.randn(m, generator=gen, dtype=torch.float64)
        floor = walkdown.residual_floor(A, r)
        sol = torch.linalg.lstsq(A, r[:, None], driver="gelsd").solution[:, 0]
        assert 1e-3 < floor <= float((A @ sol - r).norm() / r.norm()) * (1 + 1e-9)
        A[:, -1] = A[:, 0]  # rank-deficient: the bound still holds whatever U is
        assert walkdown.residual_floor(A, A @ a) <= 1e-12
    square = torch.randn(30, 30, generator=gen, dtype=torch.float64)
    assert walkdown.residual_floor(square, torch.randn(30, generator=gen, dtype=torch.float64)) == 0.0


def _two_layer_change(seed: int, lr: float):
    data = fedleak.load_dataset("fashion-mnist")
    x, y = data.batch(4, seed=100 + seed)
    model = fedleak.make_mlp(data.input_shape, [512, 256], 10, seed=seed)
    return model, x, y, fedleak.fedavg_update(model, x, y, lr=lr)


def test_the_forward_tolerance_rises_to_a_weight_changes_rounding_of_both_layers():
    model, x, y, change = _two_layer_change(1, 0.05)
    net = as_network(model, inputs=x)
    grad = HeadAttack(net.head, dict(fedleak.compute_gradient_update(model, x, y).gradients), ExclusivityOptions(),
                      torch.float32)
    assert grad.forward_tol(0) == ExclusivityOptions().forward_tol and grad.layer_floor(0) == 0.0
    from fedleak.attacks.exact.noise import step_noises

    delta = change.delta()
    attack = HeadAttack(net.head, delta, ExclusivityOptions(), torch.float32, step_noises(change.after, delta))
    floors = attack.layer_floor(0), attack.layer_floor(1)
    assert all(f > 0 for f in floors) and attack.tol_floor == floors[1]
    assert attack.forward_tol(0) == max(ExclusivityOptions().forward_tol, sum(floors))


@pytest.mark.parametrize("lr, certified, exact", [(0.05, 4, 4), (0.01, 0, 4)])
def test_two_hidden_layers_are_walked_down_under_a_small_learning_rate(lr, certified, exact):
    """The rows' inputs at the first layer are off by the change's rounding, beyond the fixed forward tolerance: no
    candidate was traced down at lr 0.01 and one of four at lr 0.05 (0 and 1 exact). At lr 0.01 the rounding still
    leaves too few witnesses within max_noise for a certificate: the inputs come back exact, uncertified."""
    model, x, y, change = _two_layer_change(1, lr)
    rec = fedleak.reconstruct(model, change, attack="exclusivity", fallback="none")
    match = fedleak.metrics.match(rec, x, y)
    assert rec.num_certified == certified and int(match.exact.sum()) == exact and match.false_certificates == 0
    assert not any("could not be traced" in n for n in rec.notes)
