"""The exact attack on the gradient of a cross-entropy with label smoothing: told it, or reading it off the update."""

import math

import pytest
import torch
import torch.nn.functional as F

import fedleak
from fedleak import metrics
from fedleak.attacks.exact.smoothing import row_values
from fedleak.attacks.exact.top_check import smoothed_labels


def _gradient(model, x, y, smoothing: float) -> dict:
    loss = F.cross_entropy(model(x), y, label_smoothing=smoothing)
    return dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))


def _smoothing_notes(rec) -> list[str]:
    return [n for n in rec.notes if "label smoothing" in n]


@pytest.mark.parametrize("widths", [[1024], [512, 256]])
def test_label_smoothing_told_or_read_certifies_what_a_plain_loss_does(fashion, widths):
    model = fedleak.make_mlp(fashion.input_shape, widths, 10, seed=0)
    x, y = fashion.batch(8, seed=8)
    plain = fedleak.reconstruct(model, _gradient(model, x, y, 0.0), num_examples=8)
    assert plain.num_certified >= 4 and not _smoothing_notes(plain)
    grads = _gradient(model, x, y, 0.1)
    for told in (0.1, None):
        rec = fedleak.reconstruct(model, fedleak.GradientUpdate(grads, num_examples=8), label_smoothing=told)
        scores = metrics.match(rec, x, y)
        assert rec.num_certified == plain.num_certified and not scores.false_certificate.any()
        assert scores.label_correct[scores.certified].all()  # a certificate holds the label too
        assert rec.label_counts.tolist() == torch.bincount(y, minlength=10).tolist()
        notes = _smoothing_notes(rec)
        assert (notes == []) if told else ("label smoothing 0.1," in notes[0])


def test_a_confident_samples_label_is_read_under_label_smoothing(fashion):
    """Inputs scaled by 255 saturate the softmax: a confident sample's label entry ``p_y - 1 + s - s/K`` lies above
    the other entries ``p_c - s/K``, so its column's least entry is not its label."""
    model = fedleak.make_mlp(fashion.input_shape, [1024], 10, seed=0)
    x, y = fashion.batch(8, seed=8)
    x = x * 255
    p = torch.softmax(model(x), 1)
    e = p - (0.9 * F.one_hot(y, 10) + 0.01)
    assert bool((e.argmin(1) != y).any())  # the sign of the entries would misread some labels
    rec = fedleak.reconstruct(model, _gradient(model, x, y, 0.1), num_examples=8)
    scores = metrics.match(rec, x, y, data_range=(0.0, 255.0))
    assert rec.num_certified >= 7 and not scores.false_certificate.any()
    assert scores.label_accuracy == 1.0


def test_smoothed_labels_leave_the_label_out_of_the_fit():
    p = torch.tensor([[0.97, 0.01, 0.02], [0.2, 0.5, 0.3]], dtype=torch.float64)
    y = torch.tensor([0, 2])
    s, K = 0.2, 3
    columns = 0.7 * (p - (1 - s) * F.one_hot(y, K) - s / K)
    assert columns[0].argmin() != 0  # the confident sample's label entry is not its least
    assert smoothed_labels(columns, p - s / K).tolist() == [0, 2]


def test_row_values_read_s_and_refuse_what_does_not_tell_it():
    K, s = 4, 0.15
    p = torch.tensor([[0.5, 0.2, 0.2, 0.1], [0.1, 0.6, 0.2, 0.1], [1 - 3e-9, 1e-9, 1e-9, 1e-9]], dtype=torch.float64)
    y = torch.tensor([2, 1, 0])
    columns = 0.3 * (p - (1 - s) * F.one_hot(y, K) - s / K)
    got = row_values(columns, p, 1e-3, 1.2e-7)
    assert got[:2].tolist() == pytest.approx([s, s], abs=1e-9)
    # a saturated sample predicting its label fits every s: not read
    assert math.isnan(float(got[2]))
    # nor one whose other probabilities are all equal: its column lies in the span of onehot(prediction) and 1,
    # which a wrong label and s fit as well
    even = torch.tensor([[0.7, 0.1, 0.1, 0.1]], dtype=torch.float64)
    column = 0.3 * (even - (1 - s) * F.one_hot(torch.tensor([0]), K) - s / K)
    assert math.isnan(float(row_values(column, even, 1e-3, 1.2e-7)[0]))
    # a plain cross-entropy's column reads no s in (0, 1)
    plain = 0.3 * (p[:2] - F.one_hot(y[:2], K))
    assert torch.isnan(row_values(plain, p[:2], 1e-3, 1.2e-7)).all()


def test_a_plain_cross_entropy_is_not_read_as_smoothed(fashion):
    # nothing certified (a batch of 128 on one hidden layer of 256): the update is read, and found plain
    model = fedleak.make_mlp(fashion.input_shape, [256], 10, seed=0)
    x, y = fashion.batch(128, seed=0)
    rec = fedleak.reconstruct(model, _gradient(model, x, y, 0.0))
    assert rec.num_certified == 0 and not _smoothing_notes(rec)


@pytest.mark.parametrize("name, smoothing, batch, least", [("lfw", 0.1, 6, 4), ("mni152", 0.2, 4, 3)])
def test_fewer_than_four_classes_take_label_smoothing_told_only(name, smoothing, batch, least):
    """Two classes: every loss vector is a multiple of (1, -1) whatever the smoothing; three: every row fits some
    smoothing off each of its entries. It is not read off the update, and the reason says to pass it."""
    data = fedleak.load_dataset(name)
    model = fedleak.make_mlp(data.input_shape, [1024], data.num_classes, seed=0)
    x, y = data.batch(batch, seed=3)
    grads = fedleak.GradientUpdate(_gradient(model, x, y, smoothing), num_examples=batch)
    plain = fedleak.reconstruct(model, fedleak.GradientUpdate(_gradient(model, x, y, 0.0), num_examples=batch))
    read = fedleak.reconstruct(model, grads)
    assert read.num_certified == 0 and not metrics.match(read, x, y).false_certificate.any()
    assert "with fewer than four classes cannot be read off the update (pass label_smoothing)" in read.summary()
    told = fedleak.reconstruct(model, grads, label_smoothing=smoothing)
    assert told.num_certified == plain.num_certified >= least and not metrics.match(told, x, y).false_certificate.any()


def test_a_cnn_under_label_smoothing(digits):
    model = fedleak.make_convnet(digits.input_shape, 10, channels=(4,), kernel=3, padding=1, pool=None,
                                 fc_widths=(512,), seed=0)
    x, y = digits.batch(4, seed=1)
    grads = _gradient(model, x, y, 0.1)
    plain = fedleak.reconstruct(model, _gradient(model, x, y, 0.0), num_examples=4)
    for told in (0.1, None):
        rec = fedleak.reconstruct(model, grads, num_examples=4, label_smoothing=told)
        scores = metrics.match(rec, x, y)
        assert rec.num_certified == plain.num_certified >= 3 and not scores.false_certificate.any()


def test_the_clients_of_fedleak_train_with_label_smoothing(fashion):
    model = fedleak.make_mlp(fashion.input_shape, [1024], 10, seed=0)
    x, y = fashion.batch(6, seed=2)
    update = fedleak.compute_gradient_update(model, x, y, label_smoothing=0.1)
    expected = _gradient(model, x, y, 0.1)
    assert all(torch.equal(update.gradients[k], expected[k]) for k in expected)
    reply = fedleak.fedavg_update(model, x, y, lr=0.05, label_smoothing=0.1)
    rec = fedleak.reconstruct(model, reply, label_smoothing=0.1)
    scores = metrics.match(rec, x, y)
    assert rec.num_certified >= 4 and not scores.false_certificate.any()


def test_label_smoothing_is_checked(fashion):
    model = fedleak.make_mlp(fashion.input_shape, [64], 10, seed=0)
    x, y = fashion.batch(2, seed=0)
    grads = _gradient(model, x, y, 0.0)
    for bad, said in [(1.0, "below 1"), (-0.1, "at least 0"), ("0.1", "real number")]:
        with pytest.raises(fedleak.FedleakError, match=said):
            fedleak.reconstruct(model, grads, label_smoothing=bad)
        with pytest.raises(fedleak.FedleakError, match=said):
            fedleak.compute_gradient_update(model, x, y, label_smoothing=bad)
    binary = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    with pytest.raises(fedleak.FedleakError, match="one output"):
        fedleak.compute_gradient_update(binary, x, (y > 4).long(), label_smoothing=0.1)
