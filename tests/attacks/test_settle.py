"""Settling candidates before the certificate (fedleak.attacks.exact.settle): on two-class data, where the
top layer's check passes hundreds of blends of samples, the settled ones are exactly candidates the
certificate would not take, and the certified samples are the same with and without settling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fedleak
from fedleak.attacks.exact import ExclusivityOptions, HeadAttack, settle
from fedleak.attacks.exact.candidates import unique_candidates
from fedleak.nets import as_network


class UserNet(nn.Module):
    """A model as users write it (``x.view``, ``F.relu``, Dropout in eval mode)."""

    def __init__(self, d_in: int, width: int, classes: int):
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(d_in, width), nn.Dropout(0.2), nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(F.relu(self.fc1(x.view(x.shape[0], -1)))))


def user_batch(data: fedleak.Dataset, m: int, width: int, seed: int, normalise: bool = False):
    torch.manual_seed(seed)
    model = UserNet(int(torch.tensor(data.input_shape).prod()), width, data.num_classes).eval()
    x, y = data.batch(m, seed=seed)
    if normalise:
        x = (x - x.mean()) / x.std()
    return model, x, y


def gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    loss = F.cross_entropy(model(x), y)
    return dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))


def without_settling(monkeypatch, fn):
    with monkeypatch.context() as m:
        m.setattr(settle, "SETTLE", float("inf"))
        return fn()


def same_results(a: fedleak.Reconstruction, b: fedleak.Reconstruction) -> None:
    assert len(a.samples) == len(b.samples)
    assert torch.equal(a.certified, b.certified) and torch.equal(a.labels, b.labels)
    assert torch.equal(a.inputs, b.inputs)
    assert a.batch_certified == b.batch_certified
    assert (a.label_counts is None) == (b.label_counts is None)
    if a.label_counts is not None:
        assert a.label_counts.tolist() == b.label_counts.tolist()


def settled_records(rec: fedleak.Reconstruction) -> list[int]:
    return [k for k, r in enumerate(rec.samples) if "read from its witness rows' output-layer columns" in r.reason]


@pytest.mark.parametrize("seed, normalise, reported", [(0, False, False), (1, True, True), (2, False, True)])
def test_two_class_blends_are_settled_and_the_certificate_is_unchanged(monkeypatch, lfw, seed, normalise, reported):
    model, x, y = user_batch(lfw, 16, 1024, seed, normalise)
    grads = gradient(model, x, y)
    update = fedleak.GradientUpdate(grads, num_examples=16) if reported else grads
    rec = fedleak.reconstruct(model, update, peel=False)  # one reading (peeling certifies most of these batches)
    full = without_settling(monkeypatch, lambda: fedleak.reconstruct(model, update, peel=False))
    same_results(rec, full)
    settled = settled_records(rec)
    assert not settled_records(full)
    assert len(settled) >= len(rec.samples) // 2  # most candidates on two-class data are blends
    assert fedleak.metrics.match(rec, x, y).false_certificates == 0
    for k in settled:
        r, f = rec.samples[k], full.samples[k]
        assert not r.certified and "blend" in r.reason
        if f.witnesses[-1]:  # the full certificate fitted its row: a scale that could never join the batch's
            assert abs(f.scale * 16 - 1) > 10 * ExclusivityOptions().scale_tol
            assert abs(r.scale / f.scale - 1) < 1e-3  # the check's scale is the fit's


def test_weight_delta_blends_are_settled_and_the_certificate_is_unchanged(monkeypatch, lfw):
    """A one-step FedAvg update: the common scale (lr/M) is unknown, so only candidates far from every
    scale a candidate with two witnesses has are settled."""
    model, x, y = user_batch(lfw, 16, 1024, 3)
    update = fedleak.fedavg_update(model, x, y, lr=0.01, local_steps=1)  # trained with the Dropout active: the
    rec = fedleak.reconstruct(model, update, train_dropout=False)  # eval-mode reading is the one settled here
    full = without_settling(monkeypatch, lambda: fedleak.reconstruct(model, update, train_dropout=False))
    same_results(rec, full)
    assert settled_records(rec)
    assert fedleak.metrics.match(rec, x, y).false_certificates == 0


def test_nothing_is_settled_under_per_sample_clipping(lfw):
    """A clipped sample's scale is its own (1/M times its clip factor), so no scale rules a candidate out."""
    model, x, y = user_batch(lfw, 16, 1024, 0)
    grads = gradient(model, x, y)
    head = as_network(model).head
    clipped = HeadAttack(head, grads, ExclusivityOptions(clip_norm=1.0), torch.float32)
    plain = HeadAttack(head, grads, ExclusivityOptions(), torch.float32)
    cands = unique_candidates(plain.top_candidates(), 0, plain.tol(plain.opts.group_tol))
    assert settle.settled_by_scale(plain, cands, 16)
    assert settle.settled_by_scale(clipped, cands, 16) == {}


def test_without_candidates_that_fix_the_scale_every_candidate_is_settled(lfw):
    """No candidate has the two witnesses a scale needs: the batch's scale is unknown (no batch size
    reported), so nothing can be certified and every candidate is settled, saying why."""
    model, x, y = user_batch(lfw, 16, 1024, 0)
    attack = HeadAttack(as_network(model).head, gradient(model, x, y), ExclusivityOptions(), torch.float32)
    cands = [c for c in unique_candidates(attack.top_candidates(), 0, attack.tol(attack.opts.group_tol))
             if len(c.witnesses[0]) < 2]
    settled = settle.settled_by_scale(attack, cands, None)
    assert sorted(settled) == list(range(len(cands)))
    assert all("no two candidates with the witnesses a certificate needs share a scale" in why
               for why in settled.values())


def test_single_witness_samples_of_a_whole_batch_are_not_settled(monkeypatch, lfw):
    """Samples with one exclusive neuron sit at the batch's scale and are certified as part of the whole batch
    (which then reproduces the whole gradient): settling leaves them to the certificate, among 80 blends."""
    torch.manual_seed(0)
    model = UserNet(625, 512, 2).eval()
    x, y = lfw.batch(8, seed=8)
    grads = fedleak.GradientUpdate(gradient(model, x, y), num_examples=8)  # two classes: the size reported
    from fedleak.attacks.exact import certificate

    settled = []
    real = certificate.settled_by_scale

    def spy(*args):
        settled.append(real(*args))
        return settled[-1]

    monkeypatch.setattr(certificate, "settled_by_scale", spy)
    rec = fedleak.reconstruct(model, grads)
    full = without_settling(monkeypatch, lambda: fedleak.reconstruct(model, grads))
    same_results(rec, full)
    # the blends are settled, then dropped with the rest: the certified samples are the whole batch
    assert rec.batch_certified and rec.num_certified == 8 == len(rec.samples)
    assert len(settled[0]) > 40
    weak = [r for r in rec.samples if r.certified and r.witnesses[-1] < 2]
    assert weak and all("reproduces the whole observed gradient" in r.reason for r in weak)
    assert fedleak.metrics.match(rec, x, y).false_certificates == 0


def test_open_candidates_without_kept_pre_activations_are_recomputed_alike(monkeypatch, lfw):
    """Candidates keep the top check's pre-activations while all kept take at most ``FIRSTS`` of the layer's
    gradient, those without the witness rows a certificate of their own needs at most ``WEAK_FIRSTS`` (the
    hundreds of one-witness blends would hold ten times the gradient); the certificate recomputes the rest and
    gets the results of recomputing them all, whatever those shares."""
    from fedleak.attacks.exact import candidates, traces

    model, x, y = user_batch(lfw, 16, 1024, 0)
    grads = gradient(model, x, y)
    real = traces.first_layer
    recomputed, open_ = {}, {}
    shares = ((candidates.FIRSTS, 0.0), (candidates.FIRSTS, candidates.WEAK_FIRSTS), (1.0, 1.0), (0.0, 1.0))
    for share in shares:
        seen = []

        def recorded(attack, X, complete, seen=seen):
            seen.append((sum(c.first_pre is None for c in complete), len(complete)))
            return real(attack, X, complete)

        monkeypatch.setattr(traces, "first_layer", recorded)
        monkeypatch.setattr(candidates, "FIRSTS", share[0])
        monkeypatch.setattr(candidates, "WEAK_FIRSTS", share[1])
        rec = fedleak.reconstruct(model, grads)
        assert seen
        recomputed[share], open_[share] = seen[0]
        monkeypatch.setattr(traces, "first_layer", lambda attack, X, complete: None)  # the pass computes all
        same_results(rec, fedleak.reconstruct(model, grads))
    # no weak one kept: every open weak one is recomputed; the default shares keep the first ones read (here none
    # of those left open); shares as large as the layer keep them all; none at all: every open one is recomputed
    none, default, whole, nothing = shares
    assert recomputed[none] >= recomputed[default] >= recomputed[whole] == 0 < recomputed[none]
    assert recomputed[nothing] == open_[nothing] > recomputed[none]
