"""Conv blocks: the plan counts equations and unknowns as the exact attack does, on Flower's quickstart CNN and on a
certifiable CNN, and its shape arithmetic is the network's."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import fedleak
from fedleak.models import FlowerNet
from fedleak.plan.conv import block_shape


@pytest.fixture(scope="module")
def retina():
    return fedleak.load_dataset("retina")


@pytest.fixture(scope="module")
def flower():
    return fedleak.load_model("flower-cnn").module


@pytest.fixture(scope="module")
def flower_plan(flower, retina):
    return fedleak.plan(flower, None, retina, batch_sizes=[1, 8], max_samples=256, name="flower-cnn")


def test_flower_cnn_cannot_and_says_why_per_block(flower_plan):
    conv1, conv2 = flower_plan.blocks
    assert (conv2.unknowns, conv2.max_equations, conv2.in_shape, conv2.out_shape) == (1176, 400, (6, 14, 14),
                                                                                      (16, 5, 5))
    assert (conv1.unknowns, conv1.max_equations) == (3072, 1176)
    assert conv2.status == conv1.status == "underdetermined" and conv2.fraction == 0
    assert conv2.equations_min <= conv2.equations_median <= 400 < conv2.needed == 1177
    assert "conv2: 16 channels x 5 x 5 after 2x2 max pooling give at most 400 equations" in conv2.reason()
    assert "for 1176 unknowns (6 x 14 x 14)" in conv2.reason()
    assert flower_plan.route == "cannot" and flower_plan.max_batch_size == 0
    assert "conv2" in flower_plan.verdict and "underdetermined" in flower_plan.verdict
    assert [e.fraction for e in flower_plan.estimates] == [0.0, 0.0]
    assert "exclusivity" not in flower_plan.recommended and "ig" in flower_plan.recommended


def _flower_variant(c1: int, c2: int, seed: int = 0) -> torch.nn.Module:
    """Flower's Net with the proposed conv changes: no pooling, c1 and c2 channels (fresh default init)."""
    torch.manual_seed(seed)
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(3, c1, 5), nn.ReLU(), nn.Conv2d(c1, c2, 5), nn.ReLU(), nn.Flatten(),
                         nn.Linear(c2 * 24 * 24, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))


def test_flower_cnn_change_is_computed_and_checked(flower_plan, retina):
    proposal = flower_plan.proposal
    kinds = {(c.layer, c.kind) for c in proposal.changes}
    assert {("conv1", "pooling"), ("conv2", "pooling"), ("conv2", "channels")} <= kinds
    after = {c.layer: c.after for c in proposal.changes if c.kind == "channels"}
    c1, c2 = after.get("conv1", 6), after["conv2"]
    assert c2 > 16
    # at batch 8 Flower's 84-wide fc2 cannot give every sample 2 exclusive neurons: it must widen too
    assert any(c.layer == "fc2" and c.kind == "width" for c in proposal.changes) or any(
        "fc2" in b for b in proposal.blocked)
    assert proposal.parameters_after > proposal.parameters_before == 62006
    # freshly initialised models with the proposed conv blocks have enough equations in both (measured, not
    # scaled; the fewest channels are marginal by design, so the typical input is asked for)
    for seed in (0, 1):
        changed = fedleak.plan(_flower_variant(c1, c2, seed), None, retina, batch_sizes=[1], max_samples=256,
                               proofs=0)
        assert all(b.equations_median >= b.unknowns for b in changed.blocks)
        assert changed.blocks[1].status == "unproven"  # enough equations; the proof was not asked for
    # and a third fewer conv2 channels would not do
    fewer = fedleak.plan(_flower_variant(c1, (2 * c2) // 3), None, retina, batch_sizes=[1], max_samples=256, proofs=0)
    assert fewer.blocks[1].status == "underdetermined"


def test_the_plans_count_is_the_attacks(flower, retina):
    x, y = retina.x[:1], retina.y[:1]
    rec = fedleak.reconstruct(flower, fedleak.compute_gradient_update(flower, x, y), attack="exclusivity",
                              fallback="none")
    found = re.search(r"'conv2'.*?(\d+) (?:equations \(non-zero pooled units\)|non-zero pooled units) for (\d+) "
                      r"unknowns", rec.samples[0].reason)
    assert found, rec.samples[0].reason
    plan = fedleak.plan(flower, None, (x, y), batch_sizes=[1])
    assert plan.blocks[1].equations_min == int(found.group(1)) and plan.blocks[1].unknowns == int(found.group(2))
    # and the attack's block solver, given conv2's true output, counts the same rows
    from fedleak.attacks.exact import EPS32, ExclusivityOptions, invert_block

    net = fedleak.as_network(flower)
    out = net.conv_pass(x).outputs[1].reshape(-1).numpy()
    solve = invert_block(net.blocks[1], out, 8 * EPS32 * np.abs(out), ExclusivityOptions())
    assert (solve.rows, solve.unknowns) == (plan.blocks[1].equations_min, plan.blocks[1].unknowns)


def test_an_unpooled_cnn_is_determined_and_the_analysis_agrees(digits):
    model = fedleak.load_model("convnet-digits").module
    x, y = digits.x[:6], digits.y[:6]
    plan = fedleak.plan(model, None, digits, batch_sizes=[4], max_samples=400)
    assert [b.status for b in plan.blocks] == ["determined", "determined"]
    assert plan.route == "applies" and "exclusivity" in plan.recommended
    report = fedleak.analyze_exclusivity(model, x, y)
    assert all(c.solvable.all() for c in report.conv_layers)


@pytest.mark.parametrize("make", [
    lambda: FlowerNet(),
    lambda: fedleak.make_convnet((1, 28, 28), 10, channels=(6, 32), padding=1, fc_widths=(64,)),
    lambda: fedleak.make_convnet((3, 17, 17), 4, channels=(5, 7), kernel=4, pool="avg", batch_norm=True,
                                 fc_widths=(16,)),
    lambda: torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, stride=2, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(3),
                                torch.nn.Flatten(), torch.nn.Linear(3 * 3 * 3, 8), torch.nn.ReLU(),
                                torch.nn.Linear(8, 2)),
])
def test_block_arithmetic_is_the_networks(make):
    model = make().eval()
    shape = (2, 17, 17) if isinstance(model, torch.nn.Sequential) and not hasattr(model, "input_shape") else None
    net = fedleak.as_network(model, input_shape=shape)
    conv_params = 0
    for blk in net.blocks:
        s = block_shape(blk)
        assert (s.conv_shape, s.out_shape, s.unknowns) == (blk.conv_shape, blk.out_shape, blk.in_dim)
        conv_params += s.parameters
    dense_params = sum(p.numel() for d in net.head.dense for p in (d.weight, d.bias) if p is not None)
    assert conv_params + dense_params == sum(p.numel() for p in model.parameters())


def test_changed_shapes_cascade(flower):
    s1, s2 = (block_shape(b) for b in fedleak.as_network(flower).blocks)
    t1 = s1.changed(channels=10, unpooled=True)
    t2 = s2.changed(in_shape=t1.out_shape, unpooled=True)
    assert t1.out_shape == (10, 28, 28) and t2.in_shape == (10, 28, 28) and t2.out_shape == (16, 24, 24)
    assert t2.needed == t2.unknowns == 7840 and s2.needed == s2.unknowns + 1
    assert np.prod(t2.out_shape) == t2.max_equations
