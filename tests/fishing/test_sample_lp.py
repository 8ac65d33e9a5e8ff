"""One sample's LP (fedleak.fishing.sample_lp): rows kept consistent with the region they are written in."""

from __future__ import annotations

import numpy as np

import fedleak
from fedleak.fishing.head_arrays import HeadArrays
from fedleak.fishing.lp import LPSettings, Requirement
from fedleak.fishing.sample_lp import RequirementTable, SampleLP, solve_sample
from fedleak.fishing.sample_net import ConvStack, SampleNet
from fedleak.nets import as_network


def _sample_net(widths=(32, 16), seed=0):
    data = fedleak.load_dataset("digits")
    model = fedleak.make_mlp(data.input_shape, list(widths), 10, seed=seed)
    x, _ = data.batch(1, seed=seed + 3)
    net = as_network(model, inputs=x)
    x0 = x.reshape(-1).double().numpy()
    sn = SampleNet(ConvStack(net), HeadArrays(net.head), x0)
    pattern = [(z > 0).astype(np.float64) for z in sn.preacts(x0)]
    return sn, x0, pattern


def test_a_unit_held_then_required_on_the_other_side_drops_the_hold():
    sn, x0, pattern = _sample_net()
    lp = SampleLP(sn, x0, pattern, LPSettings(region_margin=1e-3))
    z = sn.preacts(x0)[0]
    j = int(np.argmax(z))  # an active unit of layer 0
    lp.checked = RequirementTable()
    assert lp.hold(0, np.array([j]), z) == 1
    assert lp.pattern[0][j] == 1.0 and len(lp.problem.C) == 1
    off = Requirement(0, j, -1, 0.02)
    assert not lp.is_written(off)  # a hold on the other side is not this requirement
    lp.write([off])
    assert lp.is_written(off) and lp.pattern[0][j] == 0.0
    assert all(not (c.layer == 0 and c.neuron == j and c.sign == 1) for c in lp.checked)
    assert len(lp.problem.C) == 1  # the rows were rewritten: the hold's row is gone


def test_a_unit_held_without_a_region_margin_is_kept_clear_of_zero():
    """With ``region_margin=0`` (the defaults) a held unit's row was written at zero: the solver's point met it only to
    its tolerance, 1e-7 on the wrong side, and the forward check failed it with nothing left to move (the exclusivity
    reduction then dropped every sample of some CNN batches, "rows hold in the LP but not in the forward pass")."""
    from fedleak.fishing.sample_lp import HOLD_FLOOR

    sn, x0, pattern = _sample_net()
    lp = SampleLP(sn, x0, pattern, LPSettings())
    z = sn.preacts(x0)[0]
    lp.checked = RequirementTable()
    j = int(np.argmax(z))
    lp.hold(0, np.array([j]), z)
    held = lp.written[(0, j)]
    assert held.margin == HOLD_FLOOR * float(np.abs(z).max()) > 0
    # a requirement written with a margin of its own keeps it where that is larger
    lp2 = SampleLP(sn, x0, pattern, LPSettings(region_margin=1e-3))
    lp2.checked = RequirementTable()
    lp2.hold(0, np.array([j]), z)
    assert lp2.written[(0, j)].margin == 1e-3


def test_solved_point_keeps_lower_units_clear_of_zero_and_meets_the_targets():
    sn, x0, pattern = _sample_net(widths=(64, 32))
    z = sn.preacts(x0)
    neg = np.where(z[1] < 0, z[1], -np.inf)
    target = int(np.argmax(neg))  # the off unit of layer 1 closest to firing: make it fire
    pattern[1][target] = 1.0
    settings = LPSettings(region_margin=2e-4)
    out = solve_sample(sn, x0, pattern, [Requirement(1, target, 1, 0.02)], [], settings)
    assert out.ok, out.message
    zp = sn.preacts(out.x)
    z32 = sn.preacts(out.x.astype(np.float32), f32=True)
    assert zp[1][target] >= 0.5 * 0.02 and float(z32[1][target]) >= 0.5 * 0.02
    for h in range(2):  # no unit within float32 reach of zero, and float32 agrees with float64 on every sign
        assert (np.abs(zp[h]) >= 0.5 * 2e-4).all()
        assert ((zp[h] > 0) == (np.asarray(z32[h]) > 0)).all()
    assert out.final_seconds > 0


def test_pool_is_not_used_for_out_of_process_solvers():
    from fedleak.fishing.solvers import solves_in_process

    assert solves_in_process("highs") and not solves_in_process("pdlp") and not solves_in_process("glop")


def test_head_row_norms_are_read_a_piece_at_a_time():
    """The row norms the pricing reads (L1 and L2), a piece of rows at a time (no temporary the size of a wide
    layer), equal numpy's over the whole layer."""
    model = fedleak.make_mlp((3000,), [700], 4, seed=0)  # more rows than one piece holds
    head = HeadArrays(as_network(model).head)
    for order in (1, 2):
        want = np.linalg.norm(head.W[0], ord=order, axis=1)
        assert np.allclose(head.row_norms(0, order), want, rtol=1e-14, atol=0)
