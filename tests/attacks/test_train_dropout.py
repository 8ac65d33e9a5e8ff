"""The exact attack on the update of a client that ran the model's Dropout in training mode (``train_dropout``)."""

import pytest
import torch

import fedleak
from fedleak import metrics
from tests.user_models import DropoutMLP

TRAINING = "train-mode dropout"


def _training_client(data, m: int, seed: int, p: float = 0.2, hidden: int = 1024):
    """A user's Dropout MLP, its batch and the gradient its client computes in training mode (a random mask)."""
    torch.manual_seed(seed)
    model = DropoutMLP(data.x[0].numel(), hidden, data.num_classes, p=p)
    x, y = data.batch(m, seed=seed)
    update = fedleak.compute_gradient_update(model.train(), x, y)
    return model.eval(), x, y, update


def test_training_mode_client_rebuilt_exactly_without_a_certificate(fashion):
    """Ten classes, batches of 16: every input returned is one of the batch's, exactly and with its label (a lone
    row makes no candidate), none is certified, and the note says how the update was read."""
    found = 0
    for seed in (0, 1):
        model, x, y, update = _training_client(fashion, 16, seed)
        rec = fedleak.reconstruct(model, update, attack="exclusivity")
        scores = metrics.match(rec, x, y)
        assert rec.num_certified == 0 and len(rec) >= 4
        assert scores.exact.sum() == len(rec) and scores.label_correct[scores.matched >= 0].all()
        assert all(s.route == f"exclusivity (uncertified, {TRAINING})" for s in rec.samples)
        assert all("Dropout 'dropout' (p = 0.2) in training mode" in s.reason for s in rec.samples)
        assert any("nothing was certified as the gradient of the model in eval mode" in n for n in rec.notes)
        assert not any("Dropout is read in eval mode" in n for n in rec.notes)
        assert rec.label_counts is None  # the logits of the masked hidden layer are unknown
        found += len(rec)
        told = fedleak.reconstruct(model, update, attack="exclusivity", train_dropout=True)
        assert len(told) == len(rec) and torch.equal(told.inputs, rec.inputs)
        plain = fedleak.reconstruct(model, update, attack="exclusivity", train_dropout=False)
        assert plain.num_certified == 0 and not any(TRAINING in s.route for s in plain.samples)
        assert metrics.match(plain, x, y).exact.sum() < len(rec)
    assert found >= 16


def test_eval_mode_updates_are_certified_as_before(fashion):
    """A model with Dropout whose client computed in eval mode: certified as before, not read again; told
    ``train_dropout=True`` the same inputs are rebuilt, uncertified."""
    torch.manual_seed(1)
    model = DropoutMLP(784, 1024, 10, p=0.5).eval()
    x, y = fashion.batch(8, seed=3)
    update = fedleak.compute_gradient_update(model, x, y)
    rec = fedleak.reconstruct(model, update, attack="exclusivity")
    assert rec.num_certified >= 6 and not any(TRAINING in s.route for s in rec.samples)
    told = fedleak.reconstruct(model, update, attack="exclusivity", train_dropout=True)
    scores = metrics.match(told, x, y)
    assert told.num_certified == 0 and scores.exact.sum() >= rec.num_certified


def test_no_training_mode_reading_without_dropout(fashion):
    """A model without Dropout whose update certifies nothing (here: noised) is not read as a training-mode one."""
    model = fedleak.make_mlp(fashion.input_shape, [1024], 10, seed=0)
    x, y = fashion.batch(8, seed=0)
    update = fedleak.compute_gradient_update(model, x, y)
    noisy = fedleak.GradientUpdate({k: v + 1e-3 * v.abs().max() * torch.randn_like(v)
                                    for k, v in update.gradients.items()}, num_examples=8)
    rec = fedleak.reconstruct(model, noisy, attack="exclusivity")
    assert rec.num_certified == 0 and not any(TRAINING in s.route for s in rec.samples)
    assert not any("train_dropout" in n for n in rec.notes)


def test_two_classes_are_read_in_eval_mode_unless_told(lfw):
    """Two classes: the eval-mode check is already the training-mode one (every loss vector lies on one line), so
    the update is not read again; told, blends of samples pass the reading too. Nothing is certified either way,
    and the samples rebuilt exactly are the same."""
    model, x, y, update = _training_client(lfw, 8, 0, hidden=2048)
    rec = fedleak.reconstruct(model, update, attack="exclusivity")
    assert rec.num_certified == 0 and not any(TRAINING in s.route for s in rec.samples)
    assert "training mode" in rec.why_uncertified()
    told = fedleak.reconstruct(model, update, attack="exclusivity", train_dropout=True)
    assert told.num_certified == 0 and all(TRAINING in s.route for s in told.samples)
    assert metrics.match(told, x, y).exact.sum() >= 6


def test_fedavg_clients_train_with_dropout_active(fashion):
    """``fedavg_update`` trains in training mode, as Flower clients do: a one-step update of a Dropout model is
    read as such and its inputs rebuilt exactly, uncertified."""
    torch.manual_seed(0)
    model = DropoutMLP(784, 1024, 10, p=0.2).eval()
    x, y = fashion.batch(8, seed=4)
    update = fedleak.fedavg_update(model, x, y, lr=1.0, local_steps=1)
    rec = fedleak.reconstruct(model, update, attack="exclusivity")
    scores = metrics.match(rec, x, y)
    assert rec.num_certified == 0 and len(rec) >= 4 and scores.exact.sum() == len(rec)
    assert all(TRAINING in s.route for s in rec.samples)


def test_auto_keeps_the_rebuilt_inputs(fashion):
    """``auto`` does not hand inputs read in training mode to an optimiser that simulates the model in eval mode."""
    model, x, y, update = _training_client(fashion, 8, 2)
    rec = fedleak.reconstruct(model, update, attack="auto", budget=30, progress=False)
    scores = metrics.match(rec, x, y)
    assert rec.attack == "auto:exclusivity" and len(rec) >= 4 and scores.exact.sum() == len(rec)
    assert any("read exactly off the update's rows without a certificate" in n for n in rec.notes)


def test_auto_searches_the_rest_with_the_rebuilt_inputs_held(fashion):
    """Where the training-mode reading rebuilds part of the batch (a 3-step FedAvg update), `auto` holds those
    inputs as they are and searches the rest with DLM+."""
    torch.manual_seed(0)
    model = DropoutMLP(784, 1024, 10, p=0.2).eval()
    x, y = fashion.batch(8, seed=5)
    update = fedleak.fedavg_update(model, x, y, lr=0.01, local_steps=3)
    exact = fedleak.reconstruct(model, update, attack="exclusivity")
    held = [k for k, s in enumerate(exact.samples) if TRAINING in s.route]
    assert 1 <= len(held) < 8
    rec = fedleak.reconstruct(model, update, attack="auto", budget=8, progress=False)
    assert rec.attack == "auto:exclusivity+dlm+" and len(rec) == 8 and rec.num_certified == 0
    assert torch.equal(rec.inputs[: len(held)], exact.inputs[held])
    assert all(TRAINING in s.route for s in rec.samples[: len(held)])
    assert all(s.route == "dlm+" for s in rec.samples[len(held):])


def test_train_dropout_is_refused_for_cnns_and_checked(digits):
    model = fedleak.make_convnet(digits.input_shape, 10, channels=(4,), fc_widths=(256,), seed=0)
    x, y = digits.batch(4, seed=0)
    update = fedleak.compute_gradient_update(model, x, y)
    with pytest.raises(fedleak.FedleakError, match="train_dropout is supported for MLPs only"):
        fedleak.reconstruct(model, update, attack="exclusivity", train_dropout=True)
    with pytest.raises(fedleak.FedleakError, match="train_dropout"):
        fedleak.reconstruct(model, update, attack="exclusivity", train_dropout="yes")
