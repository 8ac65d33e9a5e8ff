"""Samples a batch holds more than once (drawn with replacement), read off their scales: returned as copies, never
certified, and held by ``auto`` instead of being moved by its search."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fedleak
from fedleak.attacks.exact.multiplicity import REPEAT_TOL, whole_multiples
from fedleak.reconstruction import SampleRecovery


class UserMLP(nn.Module):
    """An MLP as users write it."""

    def __init__(self, width: int = 1024):
        super().__init__()
        self.fc1 = nn.Linear(64, width)
        self.fc2 = nn.Linear(width, 10)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x.view(x.size(0), -1))))


@pytest.fixture(scope="module")
def digits():
    return fedleak.load_dataset("digits")


def gradient(model, x, y):
    return list(torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters())))


def copies(rec, x):
    """Per original row, how many returned inputs are it (max abs error 1e-4)."""
    flat = rec.inputs.reshape(len(rec), -1)
    return [int(((flat - row.reshape(1, -1)).abs().amax(1) < 1e-4).sum()) for row in x]


def batch(digits, seed, index):
    torch.manual_seed(seed)
    model = UserMLP().eval()
    x, y = digits.batch(8, seed=seed)
    return model, x, y, x[index], y[index]


@pytest.mark.parametrize("reported", [True, False])
def test_a_sample_drawn_twice_is_returned_twice_uncertified(digits, reported):
    model, x, y, xb, yb = batch(digits, 0, [0, 0, 1, 2, 3, 4, 5, 6])
    update = fedleak.read_update(model, gradient(model, xb, yb), num_examples=8 if reported else None)
    rec = fedleak.reconstruct(model, update, attack="exclusivity")
    assert len(rec) == 8 and rec.batch_size == 8 and not rec.batch_certified
    assert copies(rec, x[:7]) == [2, 1, 1, 1, 1, 1, 1]
    twice = [k for k, r in enumerate(rec.samples) if "repeated" in r.route]
    assert len(twice) == 2 and not rec.certified[twice].any()
    assert "holds 2 times" in rec.samples[twice[0]].reason and "not certified" in rec.samples[twice[0]].reason
    assert not rec.missing_reason and not any("blends of samples" in n for n in rec.notes)
    # without the batch size, a batch of near-copies would give the same inputs: read, not certified
    assert rec.num_certified == (6 if reported else 0)
    assert reported or "pass num_examples" in rec.why_uncertified()


def test_auto_holds_the_copies_instead_of_searching(digits):
    model, x, _, xb, yb = batch(digits, 1, [0, 0, 0, 1, 2, 3, 4, 5])
    update = fedleak.read_update(model, gradient(model, xb, yb), num_examples=8)
    rec = fedleak.reconstruct(model, update, attack="auto", progress=False)
    assert copies(rec, x[:6]) == [3, 1, 1, 1, 1, 1]
    assert any("no optimisation needed" in n for n in rec.notes)
    assert rec.num_certified == 5


def test_a_batch_holding_every_sample_twice_reported_as_eight(digits):
    """Every sample twice, 8 reported: the samples read at one unknown common scale are each held twice. None is
    certified: 4 inputs at one factor in a batch of 8 could each be the blend of two near-copies."""
    model, x, _, xb, yb = batch(digits, 2, [0, 0, 1, 1, 2, 2, 3, 3])
    update = fedleak.read_update(model, gradient(model, xb, yb), num_examples=8)
    rec = fedleak.reconstruct(model, update, attack="exclusivity")
    assert copies(rec, x[:4]) == [2, 2, 2, 2]
    assert rec.num_certified == 0 and "more than half of the batch at one factor" in rec.why_uncertified()
    assert "no exclusively activated" not in rec.why_uncertified()


def test_a_repeat_the_rest_of_the_batch_cannot_confirm_is_only_named(digits):
    """A sample drawn twice in a batch whose other samples are not all rebuilt: its reason names the reading, and
    no copy is made."""
    torch.manual_seed(0)
    model = UserMLP().eval()
    x, y = digits.batch(32, seed=0)
    index = [0, 0, *range(1, 31)]
    update = fedleak.read_update(model, gradient(model, x[index], y[index]), num_examples=32)
    rec = fedleak.reconstruct(model, update, attack="exclusivity", peel=False)
    assert not any("repeated" in r.route for r in rec.samples) and len(rec) < 32
    named = [k for k, r in enumerate(rec.samples) if "as an input the batch holds 2 times" in r.reason]
    assert len(named) == 1 and not rec.certified[named].any()
    assert "cannot confirm" in rec.samples[named[0]].reason
    assert copies(rec, x[:1]) == [1]
    # peeling certifies the other 30 and leaves the copies alone in the residual, whose whole gradient confirms them
    peeled = fedleak.reconstruct(model, update, attack="exclusivity")
    assert peeled.num_certified == 30 and copies(peeled, x[:31]) == [2] + [1] * 30
    assert sum("repeated" in r.route for r in peeled.samples) == 2
    assert fedleak.metrics.match(peeled, x[index], y[index]).false_certificates == 0


def test_whole_multiples_read_only_whole_ratios():
    samples = tuple(SampleRecovery(0, False, "", scale=s) for s in (0.25, 0.125 * 2.5, 0.125 * 3 * (1 + REPEAT_TOL / 2),
                                                                    0.125, float("nan")))
    found = whole_multiples(samples, 0.125, list(range(len(samples))))
    assert [(r.index, r.times) for r in found] == [(0, 2), (2, 3)]


def test_inputs_at_the_batch_scale_are_held_by_auto(digits):
    """Inputs the certificate did not take (one witness) whose scale is the batch's: returned uncertified, marked,
    exact; ``auto`` returns them as they are instead of moving them in its search."""
    torch.manual_seed(0)
    model = UserMLP(width=256).eval()
    x, y = digits.batch(16, seed=0)
    update = fedleak.read_update(model, gradient(model, x, y), num_examples=16)
    exact = fedleak.reconstruct(model, update, attack="exclusivity", beyond_batch=False, peel=False)
    once = [k for k, r in enumerate(exact.samples) if r.route == "exclusivity (uncertified, at the batch's scale)"]
    assert len(once) >= 2 and not exact.certified[once].any()
    assert all("auto holds it" in exact.samples[k].reason for k in once)
    assert [c for c in copies(exact, x) if c] == [1] * (exact.num_certified + len(once))  # each exact, once
    rec = fedleak.reconstruct(model, update, attack="auto", budget=3, progress=False,
                              exclusivity_options={"peel": False})
    held = [k for k, r in enumerate(rec.samples) if r.route == "exclusivity (uncertified, at the batch's scale)"]
    assert len(held) == len(once)
    assert fedleak.metrics.match(rec, x, y).exact.sum() >= exact.num_certified + len(once)


def test_a_sample_drawn_twice_in_a_one_step_fedavg_update(digits):
    """A weight update's scale is unknown (the learning rate): the certified inputs' shared factor is the unit, and
    the input at twice it comes back twice; ``auto`` then searches nothing."""
    model, x, _, xb, yb = batch(digits, 4, [0, 0, 1, 2, 3, 4, 5, 6])
    update = fedleak.fedavg_update(model, xb, yb, lr=0.1, local_steps=1)
    rec = fedleak.reconstruct(model, update, attack="auto", budget=3, progress=False)
    assert copies(rec, x[:7]) == [2, 1, 1, 1, 1, 1, 1] and rec.num_certified == 5
    assert rec.attack == "auto:exclusivity" and sum("repeated" in r for r in rec.routes) == 2
    assert rec.routes.count("exclusivity (uncertified, at the batch's scale)") == 1  # confirmed by the whole gradient


def test_the_batch_cut_keeps_an_input_at_a_whole_multiple_of_the_scale():
    """An input drawn five times sits at 5/M: ``auto``'s cut to the batch size (``beyond_batch=False``) ranks it as
    plausible as one at 1/M, above blends 2% off, so the repeat read still sees it."""
    import numpy as np

    from fedleak.attacks.exact.outcome import within_batch

    records = [SampleRecovery(0, True, "", witnesses=(9,), scale=1 / 8),
               *(SampleRecovery(0, False, "", witnesses=(3,), scale=1.02 / 8) for _ in range(7)),
               SampleRecovery(1, False, "", witnesses=(2,), scale=5 / 8 * (1 + 1e-7))]
    kept = within_batch(records, 4, 1 / 8, np.ones(len(records)))
    assert 0 in kept and 8 in kept and len(kept) == 4
