"""The exact attack on the gradient of a class-weighted cross-entropy (``F.cross_entropy(..., weight=w)``)."""

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fedleak
from fedleak import metrics
from fedleak.attacks.exact.class_weights import admissible_factors, class_scale_note

WEIGHTS = tuple(float(w) for w in torch.linspace(0.5, 3.0, 10))


def _gradient(model, x, y, weights, reduction: str = "mean") -> dict:
    loss = F.cross_entropy(model(x), y, weight=torch.tensor(weights), reduction=reduction)
    return dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))


def test_class_weights_told_certify_what_a_plain_loss_does(fashion):
    model = fedleak.make_mlp(fashion.input_shape, [1024], 10, seed=1)
    x, y = fashion.batch(8, seed=8)
    plain = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x, y))
    assert plain.num_certified >= 6
    update = fedleak.GradientUpdate(_gradient(model, x, y, WEIGHTS), num_examples=8)
    # the client's own update is the same gradient
    ours = fedleak.compute_gradient_update(model, x, y, class_weights=WEIGHTS)
    assert all(torch.equal(ours.gradients[k], v) for k, v in update.gradients.items())
    rec = fedleak.reconstruct(model, update, class_weights=WEIGHTS)
    scores = metrics.match(rec, x, y)
    assert rec.num_certified == plain.num_certified and not scores.false_certificate.any()
    assert scores.label_correct[scores.certified].all()
    assert rec.batch_size == 8 and rec.label_counts is None  # the bias gradient weighs every label
    # the same samples, certified with each one's scale: its label's weight over the batch's sum of weights
    total = sum(WEIGHTS[int(c)] for c in y)
    for r in rec.samples:
        if r.certified:
            assert r.scale == pytest.approx(WEIGHTS[r.label] / total, rel=1e-4)


def test_untold_class_weights_certify_nothing_false_and_say_so(fashion):
    model = fedleak.make_mlp(fashion.input_shape, [1024], 10, seed=0)
    x, y = fashion.batch(8, seed=8)
    update = fedleak.GradientUpdate(_gradient(model, x, y, WEIGHTS), num_examples=8)
    rec = fedleak.reconstruct(model, update)
    assert not metrics.match(rec, x, y).false_certificate.any()
    assert rec.num_certified < 8
    note = [n for n in rec.notes if "class_weights" in n]
    assert len(note) == 1 and "agree within each label" in note[0]
    assert "class-weighted" in rec.why_uncertified()
    told = fedleak.reconstruct(model, update, class_weights=WEIGHTS)
    assert told.num_certified > rec.num_certified and not [n for n in told.notes if "class_weights" in n]


def test_no_class_weight_note_on_a_plain_loss(fashion):
    model = fedleak.make_mlp(fashion.input_shape, [256], 10, seed=0)
    for seed in range(4):
        x, y = fashion.batch(32, seed=seed)
        rec = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x, y))
        assert not [n for n in rec.notes if "class_weights" in n]


def test_class_scale_note_needs_scales_shared_within_and_apart_across_labels():
    opts = fedleak.ExclusivityOptions()

    def record(label, scale, certified=False):
        return fedleak.SampleRecovery(label=label, certified=certified, reason="", witnesses=(5,), scale=scale)

    weighted = [record(1, 0.1), record(1, 0.1), record(2, 0.3)]
    assert "1: 0.3333, 2: 1" in class_scale_note(weighted, opts)
    assert class_scale_note([record(1, 0.1), record(1, 0.12), record(2, 0.3)], opts) == ""  # not shared within
    assert class_scale_note([record(1, 0.1), record(2, 0.3)], opts) == ""  # no label with two samples
    assert class_scale_note([record(1, 0.1), record(1, 0.1), record(2, 0.1)], opts) == ""  # one common scale
    assert class_scale_note([replace(r, certified=True) for r in weighted], opts) == ""  # nothing left to explain
    assert class_scale_note(weighted, replace(opts, class_weights=(1.0, 2.0, 3.0))) == ""  # told already


def test_class_weights_with_a_summed_loss_and_without_the_batch_size(digits):
    model = fedleak.make_mlp(digits.input_shape, [1024], 10, seed=0)
    x, y = digits.batch(8, seed=2)
    summed = fedleak.GradientUpdate(_gradient(model, x, y, WEIGHTS, "sum"), num_examples=8)
    rec = fedleak.reconstruct(model, summed, class_weights=WEIGHTS, loss_reduction="sum")
    assert rec.num_certified >= 6 and not metrics.match(rec, x, y).false_certificate.any()
    # a weighted mean loss's scale 1 / (sum of weights) does not give the batch size: its clients report it
    bare = fedleak.reconstruct(model, _gradient(model, x, y, WEIGHTS), class_weights=WEIGHTS)
    assert bare.num_certified == 0 and "class-weighted mean loss" in bare.why_uncertified()


def test_class_weights_of_a_fedavg_update(digits):
    model = fedleak.make_mlp(digits.input_shape, [1024], 10, seed=0)
    x, y = digits.batch(8, seed=2)
    update = fedleak.fedavg_update(model, x, y, lr=0.1, class_weights=WEIGHTS)
    rec = fedleak.reconstruct(model, update, class_weights=WEIGHTS)
    assert rec.num_certified >= 4 and not metrics.match(rec, x, y).false_certificate.any()


def test_class_weights_of_a_cnn_certify_the_whole_batch(digits):
    model = fedleak.make_convnet(digits.input_shape, 10, channels=(6, 32), kernel=3, padding=1, pool=None,
                                 fc_widths=(1024,), seed=0)
    x, y = digits.batch(4, seed=1)
    update = fedleak.compute_gradient_update(model, x, y, class_weights=WEIGHTS)
    rec = fedleak.reconstruct(model, update, class_weights=WEIGHTS, attack="exclusivity")
    scores = metrics.match(rec, x, y)
    assert rec.num_certified == 4 and rec.batch_certified and not scores.false_certificate.any()


@pytest.mark.parametrize("weights, said", [
    ((1.0, 2.0, 3.0), "has 3 entries, but the model has 10"),
    ((1.0, -1.0) + (1.0,) * 8, "one positive finite number per class"),
    ("1,2", "one positive finite number per class"),
    ((float("nan"),) * 10, "one positive finite number per class"),
])
def test_bad_class_weights_are_refused(digits, weights, said):
    model = fedleak.make_mlp(digits.input_shape, [64], 10, seed=0)
    update = fedleak.compute_gradient_update(model, digits.x[:2], digits.y[:2])
    with pytest.raises(fedleak.FedleakError, match=said):
        fedleak.reconstruct(model, update, class_weights=weights, attack="exclusivity")


def test_class_weights_are_refused_with_label_smoothing_and_for_one_output(digits):
    model = fedleak.make_mlp(digits.input_shape, [64], 10, seed=0)
    x, y = digits.x[:2], digits.y[:2]
    with pytest.raises(fedleak.FedleakError, match="with label_smoothing is not supported"):
        fedleak.compute_gradient_update(model, x, y, class_weights=WEIGHTS, label_smoothing=0.1)
    with pytest.raises(fedleak.FedleakError, match="with label_smoothing is not supported"):
        fedleak.ExclusivityOptions(class_weights=WEIGHTS, label_smoothing=0.1)
    binary = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    with pytest.raises(fedleak.FedleakError, match="one output"):
        fedleak.compute_gradient_update(binary, x, (y % 2), class_weights=(1.0, 2.0))


def test_auto_gives_the_class_weights_to_both_routes(fashion):
    model = fedleak.make_mlp(fashion.input_shape, [1024], 10, seed=0)
    x, y = fashion.batch(16, seed=16)
    update = fedleak.compute_gradient_update(model, x, y, class_weights=WEIGHTS)
    exact = fedleak.reconstruct(model, update, class_weights=WEIGHTS)
    assert 0 < exact.num_certified < 16  # the optimisation route has samples to search
    rec = fedleak.reconstruct(model, update, attack="auto", class_weights=WEIGHTS, iterations=3, budget=30,
                              progress=False)
    assert rec.num_certified == exact.num_certified and "ig" in rec.routes
    assert not metrics.match(rec, x, y).false_certificate.any()


def test_admissible_factors_are_the_sums_of_the_batchs_weights():
    got = admissible_factors((0.5, 2.0), 3)  # W = 0.5 n + 2 (3 - n), n = 0..3
    assert got.tolist() == pytest.approx(sorted(1 / np.array([6.0, 4.5, 3.0, 1.5])))
    assert admissible_factors(WEIGHTS, 3) is not None and admissible_factors(WEIGHTS, 16) is None  # too many


def test_a_lone_two_class_sample_fixes_the_factor_as_an_unweighted_one_does(lfw):
    """Two classes: the batch's ``1 / W`` is one of ``M + 1`` values, so one sample at one of them fixes it (a
    fitted factor would need two samples agreeing, or the whole batch)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(625, 2048), torch.nn.ReLU(),
                                torch.nn.Linear(2048, 2))
    x, y = lfw.batch(16, seed=5)
    x = (x - x.mean()) / x.std()
    weights = (0.5, 3.0)
    plain = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x, y), peel=False)
    rec = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x, y, class_weights=weights),
                              class_weights=weights)  # (peeling does not read class weights)
    assert rec.num_certified == plain.num_certified >= 1
    assert not metrics.match(rec, x, y, data_range=(float(x.min()), float(x.max()))).false_certificate.any()


def test_the_label_count_rule_takes_the_class_weights(fashion):
    """Under class weights a class's output-bias entry moves by ``w_c n_c``: the count rule divides by ``w_c``
    (measured: L1 error of the histogram 1.6 against 6.0 without, batches of 8, twenty seeds)."""
    from fedleak.attacks.labels import class_signal, infer_label_counts, infer_labels

    weights = tuple(float(w) for w in np.exp(np.linspace(np.log(0.25), np.log(4), 10)))
    told = plain = 0
    for seed in range(6):
        model = fedleak.make_mlp(fashion.input_shape, [256], 10, seed=seed)
        x, y = fashion.batch(8, seed=seed)
        grads = fedleak.compute_gradient_update(model, x, y, class_weights=weights).gradients
        true = np.bincount(y.numpy(), minlength=10)
        told += np.abs(infer_label_counts(class_signal(model, grads), 8, class_weights=weights) - true).sum()
        plain += np.abs(infer_label_counts(class_signal(model, grads), 8) - true).sum()
    assert told < plain / 2
    # the optimisation attacks read the labels with them
    rec = fedleak.reconstruct(model, grads, attack="ig", iterations=1, batch_size=8, class_weights=weights)
    assert sorted(rec.labels.tolist()) == infer_labels(model, grads, 8, class_weights=weights).tolist()
