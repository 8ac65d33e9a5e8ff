"""The plan's batch-size boundary against measured recovery (real attack, real data), and its wider layers against
real wider models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from user_models import confident_mlp

import fedleak


@pytest.fixture(scope="module")
def mlp():
    return fedleak.make_mlp((1, 8, 8), [1024], 10, seed=0)


@pytest.fixture(scope="module")
def mlp_plan(mlp, digits):
    return fedleak.plan(mlp, None, digits, batch_sizes=[8], name="mlp")


def _recovered(model, data, batch_size: int, seeds: range) -> float:
    fractions = []
    for seed in seeds:
        x, y = data.batch(batch_size, seed=seed)
        rec = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x, y), attack="exclusivity")
        fractions.append(fedleak.metrics.match(rec, x, y).recovered_fraction)
    return float(np.mean(fractions))


def test_the_boundary_is_where_measured_recovery_falls(mlp, mlp_plan, digits):
    boundary = mlp_plan.max_batch_size
    assert 2 <= boundary <= 64 and not mlp_plan.capped
    # batches drawn from all 1,797 digits (the plan measured a random 1,024 of them), attacked for real
    at = _recovered(mlp, digits, boundary, range(100, 105))
    beyond = _recovered(mlp, digits, 3 * boundary, range(100, 102))
    assert at >= 0.8, f"recovered {at:.2f} at the plan's boundary {boundary}"  # (measured: 0.84)
    assert beyond <= 0.7 and beyond < at - 0.25, f"recovered {beyond:.2f} at 3 x {boundary}"
    # the plan's estimate counts the peeling closure, which the attack's rounds reach less of where the subtracted
    # terms' rounding leaves the inputs they read too uncertain: at or above what it recovered, by a few points
    estimate = fedleak.plan(mlp, None, digits, batch_sizes=[boundary, 3 * boundary])
    assert -0.02 < estimate.estimates[0].fraction - at < 0.15  # (measured: 0.95 against 0.84)
    assert abs(estimate.estimates[1].fraction - beyond) < 0.12


def test_the_first_reading_is_a_floor_under_the_peeling_closure(mlp, mlp_plan, digits):
    """Where the attack peels, each estimate also gives the share its first reading certifies (the update as sent):
    at or below the closure, and what the verdict names beside it."""
    plan = fedleak.plan(mlp, None, digits, batch_sizes=[16, 64])
    for e in plan.estimates:
        assert e.one_reading is not None and 0 <= e.one_reading <= e.fraction
    (at16, at64) = plan.estimates
    assert at16.one_reading < 0.9 <= at16.fraction and at64.one_reading < at64.fraction - 0.2  # (0.79/1.0, 0.10/0.40)
    assert at16.one_reading == pytest.approx(plan.dense[0].at[0].fraction)  # one layer: its own condition
    assert "in its first reading" in mlp_plan.verdict
    (exact,) = (a for a in mlp_plan.attacks if a.name == "exclusivity")
    assert "in its first reading" in exact.why
    assert "first reading" in plan.to_text() and plan.to_dict()["estimates"][1]["one_reading"] == at64.one_reading
    assert _recovered(mlp, digits, 16, range(100, 102)) > at16.one_reading  # (measured: 1.0 in every batch)
    x, y = digits.batch(8, seed=0)  # a one-step change at a rate the server was not told: not peeled
    change = fedleak.plan(mlp, fedleak.fedavg_update(mlp, x, y, lr=0.1, local_steps=1), digits)
    assert change.estimates[0].one_reading is None and "first reading" not in change.verdict


def test_the_estimate_is_the_analysis_on_the_drawn_batches(mlp, digits):
    """Each drawn batch's per-sample verdict is what analyze_exclusivity says of that batch."""
    from fedleak.plan.activity import measure
    from fedleak.plan.exans import HeadModel

    x, y = digits.x[:300], digits.y[:300]
    act = measure(fedleak.as_network(mlp), x, y, measured=True, description="digits")
    head = HeadModel(act.dense, np.ones(300, dtype=bool), peel=True)
    joint, sent = head.joint(12), head.joint(12, peel=False)
    assert bool((joint & ~sent).any())  # peeling adds samples on these batches
    for t in range(3):
        idx = head.batches(12)[t]
        report = fedleak.analyze_exclusivity(mlp, x[idx], y[idx])
        assert report.certifiable.tolist() == joint[t].tolist()
        assert report.head_certifiable.tolist() == sent[t].tolist()
        assert report.layers[0].effective_exans.tolist() == head._own_counts(0, 12)[t].tolist()


def test_the_estimate_hears_the_rows_the_analysis_hears(digits):
    """Where samples classified with probability 1 fire neurons (their shares of the rows too small to hear), each
    drawn batch's verdict is still what analyze_exclusivity says of it; a fresh MLP's layer has no such neurons."""
    from fedleak.plan.activity import measure
    from fedleak.plan.exans import HeadModel

    model = confident_mlp()
    x = digits.x[:300]
    with torch.no_grad():
        y = model(x).argmax(1)
    y[150:] = (y[150:] + 1) % 10  # half labelled as predicted: probability 1
    act = measure(fedleak.as_network(model), x, y, measured=True, description="digits")
    assert len(act.dense[0].audible.columns) > 0  # neurons a batch hears a quiet sample on or not
    head = HeadModel(act.dense, np.ones(300, dtype=bool), peel=True)
    joint, sent = head.joint(16), head.joint(16, peel=False)
    for t in range(3):
        idx = head.batches(16)[t]
        report = fedleak.analyze_exclusivity(model, x[idx], y[idx])
        assert report.layers[0].effective_exans.tolist() == head._own_counts(0, 16)[t].tolist()
        assert (report.layers[0].effective_exans > report.layers[0].exans).any()
        assert report.certifiable.tolist() == joint[t].tolist()
        assert report.head_certifiable.tolist() == sent[t].tolist()
    fresh = measure(fedleak.as_network(fedleak.make_mlp((1, 8, 8), [256], 10, seed=0)), x, y, measured=True,
                    description="digits")
    assert len(fresh.dense[0].audible.columns) == 0


def test_a_proposed_width_holds_on_a_real_model_of_that_width(mlp_plan, digits):
    plan64 = fedleak.plan(fedleak.make_mlp((1, 8, 8), [1024], 10, seed=0), None, digits, batch_sizes=[64])
    proposal = plan64.proposal  # (peeling certifies batches of 16 at this width, and 40% of those of 64)
    assert proposal is not None and proposal.checked and proposal.fraction >= 0.95
    (change,) = proposal.changes
    assert change.kind == "width" and change.before == 1024 and change.after > 1024
    # a fresh model of the proposed width, measured (not extrapolated) on the same data
    wide = fedleak.make_mlp((1, 8, 8), [change.after], 10, seed=1)
    measured = fedleak.plan(wide, None, digits, batch_sizes=[64])
    # peeling is a cascade: near its threshold the fraction swings with the model's draw (at width 1024, 0.40 to
    # 0.91 over four seeds), so a fresh model of the proposed width lands near the target, not on it
    assert measured.estimates[0].fraction >= 0.8
    assert measured.max_batch_size >= 50
    assert proposal.parameters_after == sum(p.numel() for p in wide.parameters())


def test_wider_layers_are_predicted_as_real_wider_models_measure(digits):
    from fedleak.plan.activity import measure
    from fedleak.plan.exans import HeadModel

    x, y = digits.batch(512, seed=0)

    def head(width: int) -> HeadModel:
        net = fedleak.as_network(fedleak.make_mlp((1, 8, 8), [width], 10, seed=0))
        return HeadModel(measure(net, x, y, measured=True, description="digits").dense, np.ones(512, dtype=bool))

    narrow, wide = head(512), head(2048)
    for m in (8, 16):
        predicted = narrow.layer(0, m, 2048)
        assert abs(predicted.fraction - wide.layer(0, m).fraction) < 0.06
        assert abs(predicted.mean_exans / wide.layer(0, m).mean_exans - 1) < 0.15
    fractions = [narrow.layer(0, 16, w).fraction for w in (512, 700, 1024, 2048)]
    assert fractions == sorted(fractions) and fractions[0] < fractions[-1]


def test_samples_classified_with_probability_one_are_counted_out(digits):
    """A model that classifies some samples with probability 1 (float32): no batch size or width rebuilds those,
    and the plan said every sample was certifiable alone."""
    model = confident_mlp()
    with torch.no_grad():
        x = digits.x[:200]
        pred = model(x).argmax(1)
        y = pred.clone()
        y[100:] = (pred[100:] + 1) % 10  # half labelled as predicted: probability 1
        saturated = int((torch.softmax(model(x), 1)[torch.arange(200), y] == 1).sum())
    assert saturated >= 90
    plan = fedleak.plan(model, None, (x, y), batch_sizes=[1])
    assert plan.estimates[0].fraction <= 1 - saturated / 200 + 1e-9
    assert f"{saturated} of the 200 samples measured are classified with probability 1" in plan.verdict
    rec = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x[:1], y[:1]))  # one saturated sample
    assert len(rec) == 0 and "the batch's samples are classified with probability 1" in rec.summary()
