"""Peeling: the exclusivity attack subtracts its certified samples' terms and certifies, on what is left, the samples
a neuron shared with them leaves exclusive (:mod:`fedleak.attacks.exact.peeling`)."""

import copy

import torch
import torch.nn.functional as F

import fedleak
from fedleak.attacks.exact.batch_gradient import BatchGradient
from fedleak.attacks.exact.options import ExclusivityOptions
from fedleak.attacks.exact.peeling import residual_update
from fedleak.nets import as_network
from fedleak.updates import WeightUpdate


def test_peeling_certifies_what_the_first_reading_leaves_and_the_analysis_predicts(fashion):
    model = fedleak.make_mlp(fashion.input_shape, [1024], 10, seed=0)
    x, y = fashion.batch(32, seed=0)
    update = fedleak.compute_gradient_update(model, x, y)
    once = fedleak.reconstruct(model, update, peel=False)
    rec = fedleak.reconstruct(model, update)
    scores = fedleak.metrics.match(rec, x, y)
    report = fedleak.analyze_exclusivity(model, x, y)
    assert once.num_certified < 16 and rec.num_certified >= 28  # (measured: 6, then 32)
    assert scores.false_certificates == 0 and scores.recovered.sum() == rec.num_certified
    assert report.head_certifiable.sum() == once.num_certified and report.certifiable.all()
    assert report.peeled.sum() == 32 - once.num_certified
    peeled = [s for s in rec.samples if s.reason.startswith("certified in peeling round")]
    assert len(peeled) == rec.num_certified - once.num_certified
    assert any(n.startswith(f"peeling: {len(peeled)} more sample(s) certified") for n in rec.notes)


def test_every_round_holds_its_inputs_to_a_tenth_of_the_tolerance(fashion, monkeypatch):
    """The first reading holds its inputs to ``exact_tol``; every peeling round, the first included, to a tenth of it
    (a residual's noise can hide a confident sample's share in a row: on a trained model a first round without the
    margin certified such a blend 1.8e-4 of the range off)."""
    from fedleak.attacks.exact import pipeline

    tolerances = []
    read = pipeline.run_pinned

    def spy(model, net, update, opts, *args):
        tolerances.append(opts.exact_tol)
        return read(model, net, update, opts, *args)

    monkeypatch.setattr(pipeline, "run_pinned", spy)
    model = fedleak.make_mlp(fashion.input_shape, [1024], 10, seed=0)
    x, y = fashion.batch(32, seed=0)
    rec = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x, y), exact_tol=2e-4)
    assert rec.num_certified > 6 and len(tolerances) >= 2  # (the first reading certifies 6)
    assert tolerances[0] == 2e-4 and all(t == 2e-5 for t in tolerances[1:])


def test_the_residual_is_the_gradient_of_the_samples_left(digits):
    """What peeling reads is the uncertified samples' own mean-loss gradient (float64 autograd here), to the
    update's float32 rounding; on the rows one of them alone moves (those peeling reads), each row within the noise
    it states."""
    model = fedleak.make_mlp(digits.input_shape, [256, 128], 10, seed=1)
    x, y = digits.batch(12, seed=3)
    update = fedleak.compute_gradient_update(model, x, y)
    keep = torch.arange(12) < 5  # read as if the first five were certified
    residual, noise, _ = residual_update(model, as_network(model), update, x[keep], y[keep],
                                      torch.full((5,), 1 / 12, dtype=torch.float64), ExclusivityOptions(), None)
    assert residual.num_examples == 7
    twin = copy.deepcopy(model).double()
    truth = torch.autograd.grad(F.cross_entropy(twin(x[~keep].double()), y[~keep]), list(twin.parameters()))
    for (name, got), want in zip(residual.gradients.items(), truth):
        assert float((got.double() - want).abs().max()) <= 1e-6 * float(want.abs().max()), name
    alone = (model[1](x[~keep].flatten(1)) > 0).sum(0) == 1
    err = (residual.gradients["1.weight"].double() - truth[0])[alone].norm(dim=1)
    assert int(alone.sum()) >= 10 and bool((err <= noise["1.weight"].read()[alone].norm(dim=1)).all())


def test_a_rounds_terms_added_to_the_earlier_rounds_leave_the_residual_of_all_at_once(digits, monkeypatch):
    """A round takes its new samples' terms and adds them to the earlier rounds' (PeeledTerms): the residual is the
    one of every certified sample's terms taken at once, to the update's rounding; where the two computations
    cannot be added (the weights streamed otherwise), every sample's terms are taken again."""
    model = fedleak.make_mlp(digits.input_shape, [256, 128], 10, seed=2)
    x, y = digits.batch(12, seed=4)
    update = fedleak.compute_gradient_update(model, x, y)
    net, scales, opts = as_network(model), torch.full((5,), 1 / 12, dtype=torch.float64), ExclusivityOptions()
    whole, _, terms = residual_update(model, net, update, x[:5], y[:5], scales, opts, None)
    assert terms.count == 5
    _, _, first = residual_update(model, net, update, x[:2], y[:2], scales[:2], opts, None)
    added, _, terms = residual_update(model, net, update, x[:5], y[:5], scales, opts, None, first)
    assert terms.count == 5
    for name, got in added.gradients.items():
        want = whole.gradients[name]
        assert torch.allclose(got, want, rtol=0, atol=2 * float(torch.finfo(got.dtype).eps) * float(want.abs().max()))

    def refuse(self, other):
        raise ValueError("streamed otherwise")

    monkeypatch.setattr(BatchGradient, "plus", refuse)
    again, _, terms = residual_update(model, net, update, x[:5], y[:5], scales, opts, None, first)
    assert terms.count == 5 and all(torch.equal(again.gradients[k], v) for k, v in whole.gradients.items())


def test_near_copies_left_after_peeling_are_not_certified(fashion):
    """Two near-copies (a sample and itself plus noise of 1e-3) share every neuron: peeling the rest of the batch
    leaves their blend, which must stay uncertified."""
    model = fedleak.make_mlp(fashion.input_shape, [1024], 10, seed=2)
    x, y = fashion.batch(12, seed=5)
    g = torch.Generator().manual_seed(0)
    x = torch.cat([x, (x[:1] + 1e-3 * torch.randn(x[:1].shape, generator=g)).clamp(0, 1)])
    y = torch.cat([y, y[:1]])
    rec = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x, y))
    scores = fedleak.metrics.match(rec, x, y)
    assert scores.false_certificates == 0
    assert rec.num_certified >= 10 and not scores.recovered[[0, 12]].any()


def test_peeling_needs_the_batch_scale_pinned(fashion):
    """Without the reported batch size, under a whole-update clipping (an unknown factor) or class weights, or on a
    weight change at an unknown learning rate, nothing is peeled; at the learning rate the server set it is."""
    model = fedleak.make_mlp(fashion.input_shape, [1024], 10, seed=0)
    x, y = fashion.batch(32, seed=0)
    update = fedleak.compute_gradient_update(model, x, y)
    once = fedleak.reconstruct(model, update, peel=False).num_certified
    plain = dict(update.gradients)
    assert not any(n.startswith("peeling") for n in fedleak.reconstruct(model, plain).notes)
    clip = "clipping:bound=0.01,per=update"
    clipped = fedleak.defended_gradient(model, x, y, clip, seed=0).update
    read = fedleak.reconstruct(model, clipped, defense=clip)
    assert read.num_certified <= once and not any(n.startswith("peeling") for n in read.notes)
    weights = tuple(float(w) for w in torch.linspace(0.5, 2.0, 10))
    weighted = fedleak.compute_gradient_update(model, x, y, class_weights=weights)
    assert fedleak.reconstruct(model, weighted, class_weights=weights).num_certified <= once
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    after = {n: before[n] - 1.0 * g for n, g in update.gradients.items()}  # (at 0.1 the weights' rounding is
    change = WeightUpdate(before, after, num_examples=32, learning_rate=1.0)  # too coarse for the rows it leaves)
    known = fedleak.reconstruct(model, change)
    assert known.num_certified > fedleak.reconstruct(model, change, peel=False).num_certified
    assert fedleak.metrics.match(known, x, y).false_certificates == 0
    unknown = fedleak.reconstruct(model, WeightUpdate(before, after, num_examples=32))
    assert not any(n.startswith("peeling") for n in unknown.notes)


def test_peeling_reads_a_user_module_with_label_smoothing_and_a_cast(lfw):
    """A user's class that casts its input (``x.float()``), trained with label smoothing declared as a defense:
    the terms are recomputed in float64 through the cast, with the smoothed loss."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(625, 1024), torch.nn.Linear(1024, 2)

        def forward(self, x):
            return self.fc2(F.relu(self.fc1(x.float().view(x.size(0), -1))))

    torch.manual_seed(0)
    model = Net().eval()
    x, y = lfw.batch(16, seed=1)
    sent = fedleak.compute_gradient_update(model, x, y, label_smoothing=0.1)
    once = fedleak.reconstruct(model, sent, defense="label-smoothing:smoothing=0.1", peel=False)
    rec = fedleak.reconstruct(model, sent, defense="label-smoothing:smoothing=0.1")
    assert rec.num_certified > once.num_certified
    assert fedleak.metrics.match(rec, x, y).false_certificates == 0
