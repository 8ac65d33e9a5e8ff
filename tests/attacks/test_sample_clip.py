"""Per-sample clipping the client did not declare: the samples it clipped sit below the batch's scale, their own
gradients at one norm; the note names that norm, and passing it certifies them."""

import re

import pytest
import torch
from torch.nn import functional as F

import fedleak
from fedleak.attacks.exact.sample_clip import CLIP_TOL

from .test_multiplicity import UserMLP, gradient


@pytest.fixture(scope="module")
def digits():
    return fedleak.load_dataset("digits")


def clipped_gradient(model, x, y, bound):
    """The mean of the per-sample gradients, each scaled to norm at most ``bound`` (DP-SGD without noise)."""
    per = [torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), list(model.parameters()))
           for i in range(len(x))]
    norms = [float(torch.sqrt(sum((g**2).sum() for g in gs))) for gs in per]
    return [sum(gs[j] * min(1.0, bound / n) for gs, n in zip(per, norms)) / len(x) for j in range(len(per[0]))], norms


@pytest.mark.parametrize("seed", [0, 1])
def test_undeclared_per_sample_clipping_is_named_with_its_bound(digits, seed):
    torch.manual_seed(seed)
    model = UserMLP().eval()
    x, y = digits.batch(8, seed=seed)
    _, norms = clipped_gradient(model, x, y, float("inf"))
    bound = sorted(norms)[3]  # four of the eight clipped
    grads, _ = clipped_gradient(model, x, y, bound)
    update = fedleak.read_update(model, grads, num_examples=8)
    rec = fedleak.reconstruct(model, update, attack="exclusivity")
    note = next(n for n in rec.notes if "clip_norm=" in n)
    read = float(re.search(r"clip_norm=([0-9.e+-]*[0-9])", note).group(1))
    assert read == pytest.approx(bound, rel=CLIP_TOL)
    assert rec.num_certified < 8 and any("clipped to gradient norm" in s.reason for s in rec.samples)
    declared = fedleak.reconstruct(model, update, attack="exclusivity", clip_norm=read)
    scores = fedleak.metrics.match(declared, x, y)
    assert declared.num_certified > rec.num_certified and scores.false_certificates == 0


def test_no_note_without_clipping(digits):
    torch.manual_seed(0)
    model = UserMLP().eval()
    x, y = digits.batch(8, seed=0)
    rec = fedleak.reconstruct(model, fedleak.read_update(model, gradient(model, x, y), num_examples=8),
                              attack="exclusivity")
    assert not any("clip_norm=" in n for n in rec.notes)
