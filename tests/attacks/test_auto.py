"""attack="auto": exact exclusivity route first, optimisation for the rest, and bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fedleak
from fedleak.clients import fedavg_update
from fedleak.models.cnn import make_lenet

pytestmark = pytest.mark.usefixtures("one_thread")


def test_one_step_unknown_lr_is_recovered_exactly(digits):
    x, y = digits.batch(4, seed=11)
    model = fedleak.make_mlp(digits.input_shape, [512], 10, seed=0)
    update = fedavg_update(model, x, y, lr=0.37, local_steps=1)  # the server knows neither lr nor steps
    rec = fedleak.reconstruct(model, update, attack="auto")
    scores = fedleak.metrics.match(rec, x, y)
    assert rec.attack == "auto:exclusivity"
    assert scores.recovered.all() and not scores.false_certificate.any()
    assert any("learning rate cancels" in n for n in rec.notes)
    assert any("no optimisation needed" in n for n in rec.notes)


def test_multi_step_skips_the_exact_route(digits):
    x, y = digits.batch(1, seed=12)
    model = fedleak.make_mlp(digits.input_shape, [32], 10, seed=0)
    update = fedavg_update(model, x, y, lr=0.05, local_steps=3, reveal_local_steps=True)
    rec = fedleak.reconstruct(model, update, attack="auto", iterations=200)
    assert rec.attack == "auto:dlm+"
    assert any("exact route skipped" in n and "3 local steps" in n for n in rec.notes)
    assert not rec.certified.any() and rec.iterations == 200
    assert fedleak.metrics.match(rec, x, y).mean_psnr() > 20


def test_cnn_gradient_falls_back_to_ig(digits):
    x, y = digits.batch(1, seed=13)
    model = make_lenet(digits.input_shape, 10, activation="sigmoid", seed=0)
    update = fedleak.compute_gradient_update(model, x, y)
    rec = fedleak.reconstruct(model, update, attack="auto", iterations=20)
    assert rec.attack == "auto:ig" and rec.iterations == 20
    assert any("not a ReLU network the exact attack reads" in n for n in rec.notes)


def test_bad_weight_updates(digits):
    x, y = digits.batch(2, seed=14)
    model = fedleak.make_mlp(digits.input_shape, [32], 10, seed=0)
    other = fedleak.make_mlp(digits.input_shape, [16], 10, seed=0)
    update = fedavg_update(other, x, y, lr=0.1)
    for attack in ("auto", "dlm", "dlm+", "ig", "dlg", "idlg"):
        with pytest.raises(fedleak.FedleakError, match="shape"):
            fedleak.reconstruct(model, update, attack=attack)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    after = {k: v + 0.01 for k, v in before.items()}
    with pytest.raises(fedleak.FedleakError, match="differ in keys"):
        fedleak.WeightUpdate(before=before, after={k: v for k, v in after.items() if k != "1.bias"})
    with pytest.raises(fedleak.FedleakError, match="zero"):
        fedleak.WeightUpdate(before=before, after={k: v.clone() for k, v in before.items()})
    renamed = {f"net.{k}": v for k, v in before.items()}
    with pytest.raises(fedleak.FedleakError, match="model does not have"):
        fedleak.reconstruct(model, fedleak.WeightUpdate(renamed, {k: v + 0.01 for k, v in renamed.items()}),
                            attack="dlm")
    with pytest.raises(fedleak.FedleakError, match="unknown option"):
        fedleak.reconstruct(model, fedavg_update(model, x, y, lr=0.1), attack="dlm", iteratoins=3)


def test_partial_certification_keeps_certified_samples_fixed(digits):
    """Where only some samples are certified, they are kept exactly and DLM+ searches the rest."""
    x, y = digits.batch(8, seed=0)
    model = fedleak.make_mlp(digits.input_shape, [1024], 10, seed=0)
    update = fedavg_update(model, x, y, lr=0.1, local_steps=1)
    rec = fedleak.reconstruct(model, update, attack="auto", iterations=30)
    scores = fedleak.metrics.match(rec, x, y)
    n_cert = rec.num_certified
    assert rec.attack == "auto:exclusivity+dlm+" and 0 < n_cert < 8 and len(rec) == 8
    assert scores.recovered.sum() == n_cert and not scores.false_certificate.any()
    assert any("come from the exclusivity attack" in n for n in rec.notes)
    assert sorted(rec.labels.tolist()) == sorted(y.tolist())


def _plain_mlp_weight_update(digits):
    """A plain nn.Sequential MLP on flat inputs (no Flatten, no input_shape attribute) and a one-step update."""
    x, y = digits.batch(8, seed=0)
    x = x.reshape(8, -1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 10))
    return model, fedavg_update(model, x, y, lr=0.1, local_steps=1), x, y


def test_plain_sequential_weight_update_keeps_certified_samples_and_adds_the_rest(digits):
    """No input shape anywhere: the exact route's certified samples come back exactly, plus DLM+'s for the rest
    (searched in the shape the exact route rebuilt)."""
    model, update, x, y = _plain_mlp_weight_update(digits)
    exact = fedleak.reconstruct(model, update, attack="exclusivity")
    assert 0 < exact.num_certified < 8
    rec = fedleak.reconstruct(model, update, attack="auto", iterations=20)
    assert rec.attack == "auto:exclusivity+dlm+" and len(rec) == 8 and rec.inputs.shape[1:] == (64,)
    assert rec.num_certified == exact.num_certified
    assert (rec.inputs[rec.certified] == exact.inputs[exact.certified]).all()
    scores = fedleak.metrics.match(rec, x, y)
    assert scores.recovered.sum() >= exact.num_certified and not scores.false_certificate.any()


def test_certified_samples_survive_a_failing_fallback(digits, monkeypatch):
    """Should the fallback refuse the model, the samples the exact route certified are still returned."""

    def refuse(*args, **kwargs):
        raise fedleak.ModelError("the fallback cannot read this model")

    monkeypatch.setattr("fedleak.attacks.auto.dlm_plus_attack", refuse)
    model, update, x, y = _plain_mlp_weight_update(digits)
    rec = fedleak.reconstruct(model, update, attack="auto")
    assert rec.attack == "auto:exclusivity" and 0 < len(rec) == rec.num_certified < 8
    assert fedleak.metrics.match(rec, x, y).recovered.sum() == len(rec)
    assert any("could not search for the other samples" in n for n in rec.notes)
