"""Samples that share every active unit, their label and their loss vector's direction read as one blend of them: on
two classes, on a model whose logits barely move, and, on any model, near-copies (a sample and copies of it moved by a
little noise). Certified only where the scale tells a blend (a reported batch size at a pinned scale; more than half
of the batch at an unknown factor). Real data (digits), real autograd, models with few live units (as a dying-ReLU
model has) and fedleak's default-initialised MLPs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fedleak
from fedleak.attacks.exact.like_blends import ALIKE_NEAR, ALIKE_TWO, FEW, MARK, UNREPORTED, logit_spread, unexcluded

pytestmark = pytest.mark.usefixtures("one_thread")


def _few_live_units(x: torch.Tensor, groups: list[list[int]], seed: int = 0, gain: float = 1e-3,
                    classes: int = 2) -> nn.Sequential:
    """A 64-256-``classes`` MLP whose units all stay silent but two per group, which fire for that group's samples
    only and move the logits by ``gain`` times what they would (the samples' predictions then agree closely, as on a
    model trained into few live units)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, classes))
    flat = x.flatten(1)
    with torch.no_grad():
        model[1].bias.fill_(-1e3)
        for g, members in enumerate(groups):
            others = [k for k in range(len(x)) if k not in members]
            direction = flat[members].mean(0) - (flat[others].mean(0) if others else 0)
            for unit in (2 * g, 2 * g + 1):
                w = direction + 0.05 * torch.randn(64)
                inside, outside = (flat[members] @ w).min(), (flat[others] @ w).max() if others else -1e9
                model[1].weight[unit] = w
                model[1].bias[unit] = -(inside + max(outside, inside - 10.0)) / 2
                model[3].weight[:, unit] *= gain  # the live units barely move the logits: like predictions
    return model.eval()


def _batch(digits, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    keep = (digits.y == 0).nonzero().flatten()[:count]
    return digits.x[keep], torch.zeros(count, dtype=torch.long)


def _gradient(model, x, y) -> dict[str, torch.Tensor]:
    loss = F.cross_entropy(model(x), y)
    return dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))


def test_a_blend_of_like_samples_is_not_certified_without_the_batch_size(digits):
    """Three samples sharing their two live units and their label: read without the batch size, their gradient was
    certified as one sample (the blend of the three); two such pairs as two samples."""
    x, y = _batch(digits, 3)
    model = _few_live_units(x, [[0, 1, 2]])
    h = F.relu(model[1](x.flatten(1)))
    assert ((h > 0).sum(1) == 2).all() and (h > 0).any(0).sum() == 2  # one shared pattern of two live units
    grads = _gradient(model, x, y)
    rec = fedleak.reconstruct(model, grads)
    assert rec.num_certified == 0 and UNREPORTED.format(alike=ALIKE_TWO) in rec.why_uncertified()
    assert len(rec) == 1 and rec.samples[0].route.endswith(f", {MARK})")
    assert float((rec.inputs[0].flatten() - x.flatten(1)).abs().amax(1).min()) > 1e-2  # a blend, not a sample
    told = fedleak.reconstruct(model, fedleak.GradientUpdate(grads, num_examples=3))
    assert told.num_certified == 0  # at the reported size its scale shows: about 3 samples' worth
    x, y = _batch(digits, 4)  # two pairs, each sharing its live units: read as two samples of a batch of 2
    model = _few_live_units(x, [[0, 1], [2, 3]])
    rec = fedleak.reconstruct(model, _gradient(model, x, y))
    assert rec.num_certified == 0 and len(rec) == 2 and not fedleak.metrics.match(rec, x, y).false_certificate.any()
    auto = fedleak.reconstruct(model, grads, attack="auto", budget=5, progress=False)
    assert auto.num_certified == 0 and not fedleak.metrics.match(auto, x, y).false_certificate.any()


def test_blends_at_an_unknown_factor_need_more_than_half_of_the_batch(digits):
    """Two pairs, each sharing its live units: a one-step weight update of the four, at an unknown learning rate,
    reads as two samples at one factor (two blends of two), which were certified (and read as held twice each): not
    now, as 2 x 2 <= 4."""
    x, y = _batch(digits, 4)
    model = _few_live_units(x, [[0, 1], [2, 3]], gain=1e-2)
    client = copy.deepcopy(model)
    opt = torch.optim.SGD(client.parameters(), lr=100.0)  # rows well above the rounding of the client's weights
    opt.zero_grad()
    F.cross_entropy(client(x), y).backward()
    opt.step()
    rec = fedleak.reconstruct(model, fedleak.WeightUpdate(model.state_dict(), client.state_dict(), num_examples=4))
    assert rec.num_certified == 0 and not fedleak.metrics.match(rec, x, y).false_certificate.any()
    assert any(FEW.format(alike=ALIKE_TWO, n=2, m=4) == n for n in rec.notes)


def test_the_rule():
    assert unexcluded("", 3, None, True) == UNREPORTED.format(alike=ALIKE_NEAR)  # near-copies, on any model
    assert unexcluded("", 2, 4, False) == FEW.format(alike=ALIKE_NEAR, n=2, m=4)
    assert unexcluded("", 3, 5, False) == unexcluded("", 1, 1, True) == ""
    assert unexcluded(ALIKE_TWO, 0, None, True) == ""
    assert unexcluded(ALIKE_TWO, 1, None, True) == UNREPORTED.format(alike=ALIKE_TWO)
    assert unexcluded(ALIKE_TWO, 1, 1, True) == ""  # a pinned scale shows a blend of k at k times a sample's
    assert unexcluded(ALIKE_TWO, 2, 4, False) == FEW.format(alike=ALIKE_TWO, n=2, m=4)
    assert unexcluded(ALIKE_TWO, 3, 5, False) == ""  # three blends of two would need six samples


def test_the_plan_asks_for_the_batch_size(lfw):
    model = fedleak.make_mlp(lfw.input_shape, [256], 2, seed=0)
    x, y = lfw.batch(4, seed=0)
    grads = _gradient(model, x, y)
    assert "pass num_examples" in fedleak.plan(model, grads).verdict
    assert "pass num_examples" not in fedleak.plan(model, fedleak.GradientUpdate(grads, num_examples=4)).verdict


def test_the_plan_asks_for_the_learning_rate_of_a_weight_change(lfw):
    """A two-class weight change at an unknown rate certifies only where more than half of the batch does: the plan
    says to pass the rate; a change that carries it, and one of several declared steps, are not asked for it."""
    model = fedleak.make_mlp(lfw.input_shape, [256], 2, seed=0)
    x, y = lfw.batch(8, seed=0)
    update = fedleak.fedavg_update(model, x, y, lr=0.1)
    assert "pass learning_rate" in fedleak.plan(model, update).verdict
    told = fedleak.fedavg_update(model, x, y, lr=0.1, reveal_learning_rate=True)
    assert "pass learning_rate" not in fedleak.plan(model, told).verdict
    several = fedleak.fedavg_update(model, x, y, lr=0.1, local_steps=3, reveal_local_steps=True)
    assert "pass learning_rate" not in fedleak.plan(model, several).verdict


def test_ten_classes_on_a_model_whose_logits_barely_move(digits):
    """Ten classes, but the live units move the logits by 1e-4 of what they would: every prediction is about the
    same, the loss vectors alike, and three samples read as one (certified before). A model whose logits move reads
    the same inputs without the batch size as with it, and certifies them with it only (near-copies, below)."""
    x, y = _batch(digits, 3)
    model = _few_live_units(x, [[0, 1, 2]], gain=1e-4, classes=10)
    rec = fedleak.reconstruct(model, _gradient(model, x, y))
    assert rec.num_certified == 0 and "barely depend on its input" in rec.why_uncertified()
    assert logit_spread(model, x, 1.0) < 1e-2
    healthy = fedleak.make_mlp(digits.input_shape, [256], 10, seed=0)
    x, y = digits.batch(6, seed=3)
    assert logit_spread(healthy, x, 1.0) > 0.5
    plain = fedleak.reconstruct(healthy, _gradient(healthy, x, y))
    told = fedleak.reconstruct(healthy, fedleak.GradientUpdate(_gradient(healthy, x, y), num_examples=6))
    assert told.num_certified >= 4 and plain.num_certified == 0 and ALIKE_NEAR in plain.why_uncertified()
    assert fedleak.metrics.match(plain, x, y).exact.sum() >= told.num_certified


def _near_copies(x: torch.Tensor, eps: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (x + eps * (2 * torch.rand(x.shape, generator=gen) - 1)).clamp(0, 1)


def test_near_copies_are_never_certified_as_samples(digits):
    """Ten classes, a default-initialised MLP 64-1024-10: three samples and a copy of each moved by noise of 1e-3 of
    the range, and a drifting signal (8 readings, each within 3e-4 of the one before). Each pair's rows give its
    blend to about the square of the noise, at twice a sample's scale; the drifting readings give one input at 8
    times it. All were certified (3, 3 and 1 false certificates): with the 6 examples reported, as 3 samples at an
    unknown common factor; without, as a batch of 3, and the signal as a batch of 1."""
    model = fedleak.make_mlp(digits.input_shape, [1024], 10, seed=0)
    x, y = digits.batch(3, seed=0)
    xb, yb = torch.cat([x, _near_copies(x, 1e-3)]), torch.cat([y, y])
    pairs = fedleak.compute_gradient_update(model, xb, yb)
    steps = 3e-4 * (2 * torch.rand((8, 1, 8, 8), generator=torch.Generator().manual_seed(0)) - 1)
    xc, yc = (x[:1] + steps.cumsum(0)).clamp(0, 1), y[:1].repeat(8)
    drift = fedleak.compute_gradient_update(model, xc, yc)
    for update, xs, ys, why in ((pairs, xb, yb, FEW.format(alike=ALIKE_NEAR, n=3, m=6)),
                                (dict(pairs.gradients), xb, yb, UNREPORTED.format(alike=ALIKE_NEAR)),
                                (dict(drift.gradients), xc, yc, UNREPORTED.format(alike=ALIKE_NEAR)),
                                (drift, xc, yc, "")):
        rec = fedleak.reconstruct(model, update)
        assert rec.num_certified == 0 and fedleak.metrics.match(rec, xs, ys).false_certificates == 0
        assert why in rec.why_uncertified()
    blends = fedleak.reconstruct(model, dict(pairs.gradients))
    assert len(blends) == 3 and all(r.route.endswith(f", {MARK})") for r in blends.samples)


def test_the_plan_asks_every_model_for_the_batch_size_and_the_rate(digits):
    """Ten classes: a gradient without its size, and a weight change at an untold rate, read "pass num_examples" and
    "pass learning_rate"; where at most half of the batch meets the condition, the plan expects nothing certified."""
    model = fedleak.make_mlp(digits.input_shape, [256], 10, seed=0)
    x, y = digits.batch(32, seed=0)
    assert "pass num_examples" in fedleak.plan(model, _gradient(model, x, y)).verdict
    untold = fedleak.plan(model, fedleak.fedavg_update(model, x, y, lr=0.1, local_steps=1)).verdict
    assert "pass learning_rate" in untold and "so expect none" in untold
    x, y = digits.batch(4, seed=0)
    few = fedleak.plan(model, fedleak.fedavg_update(model, x, y, lr=0.1, local_steps=1)).verdict
    assert "pass learning_rate" in few and "expect none" not in few
    told = fedleak.plan(model, fedleak.fedavg_update(model, x, y, lr=0.1, local_steps=1, reveal_learning_rate=True))
    assert "pass learning_rate" not in told.verdict


@pytest.mark.parametrize("spec", ["clipping:bound=0.01,per=update", "central-dp:noise_multiplier=1,clip=0.01"])
def test_a_clipped_update_read_defense_aware_certifies_no_blend_of_near_copies(fashion, spec):
    """Two pairs of near-copies (a sample and the sample moved by noise of 1e-3), their update clipped as a whole. Told
    the defense, the attack reads the clipped update at an unknown factor, but the checks after the reading took the
    options as given, at a pinned scale: both blends were certified as samples, in 20 of 20 such batches (gradients)
    and in 6 of 10 one-step weight changes whose learning rate the server knew."""
    from fedleak.defenses.stack import DefenseStack
    from fedleak.updates import WeightUpdate

    model = fedleak.make_mlp(fashion.input_shape, [256], 10, seed=0)
    base, labels = fashion.batch(2, seed=0)
    noise = 1e-3 * torch.randn(base.shape, generator=torch.Generator().manual_seed(0))
    x, y = torch.cat([base, (base + noise).clamp(0, 1)]), torch.cat([labels, labels])
    sent = fedleak.defended_gradient(model, x, y, spec, seed=0).update
    step = fedleak.fedavg_update(model, x, y, lr=0.1, momentum=0.0, reveal_learning_rate=True)
    clipped = DefenseStack.of(spec).filter(step.delta(), None, torch.Generator().manual_seed(0))
    change = WeightUpdate(step.before, {k: step.before[k] - clipped[k] for k in step.before}, num_examples=4,
                          learning_rate=0.1)
    for update in (sent, change):
        rec = fedleak.reconstruct(model, update, attack="exclusivity", defense=spec, data_range=(0, 1))
        scores = fedleak.metrics.match(rec, x, y, data_range=(0, 1))
        assert rec.num_certified == 0 and scores.false_certificates == 0
        assert len(rec) >= 1  # the blends still come back, uncertified
