"""A client that keeps the output layer frozen (FedBABU trains the body under a fixed random classifier): its update
holds nothing of that layer. The exact attack refuses by name; the first-layer attack, ``auto`` and the
optimisation attacks read what the update holds, learning the labels the output layer would have told."""

from __future__ import annotations

import pytest
import torch
from user_models import FrozenHeadMLP

import fedleak
from fedleak import metrics
from fedleak.attacks.labels import class_signal, reads_classes


def _model() -> FrozenHeadMLP:
    torch.manual_seed(0)
    return FrozenHeadMLP().eval()


def test_the_update_holds_no_output_layer_and_the_label_rule_says_what_to_pass(digits):
    model = _model()
    x, y = digits.batch(4, seed=1)
    update = fedleak.compute_gradient_update(model, x, y)
    assert set(update.gradients) == {"fc1.weight", "fc1.bias"}
    assert not reads_classes(model, update.gradients)
    with pytest.raises(fedleak.FedleakError, match="no gradient of the output layer 'fc2.weight'.*pass labels="):
        class_signal(model, update.gradients)


def test_the_exact_attack_names_the_frozen_layer_on_gradients_and_weight_changes(digits):
    model = _model()
    x, y = digits.batch(4, seed=1)
    for update in (fedleak.compute_gradient_update(model, x, y), fedleak.fedavg_update(model, x, y, lr=0.05)):
        with pytest.raises(fedleak.ModelError, match="frozen parameter.*fc2.weight.*first-layer attack"):
            fedleak.reconstruct(model, update, attack="exclusivity")


def test_one_sample_is_certified_through_the_first_layer(digits):
    model = _model()
    x, y = digits.batch(1, seed=3)
    rec = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x, y), attack="auto", budget=5)
    scores = metrics.match(rec, x, y)
    assert rec.num_certified == 1 and scores.max_abs_error[0] < 1e-4 and not scores.false_certificate.any()


@pytest.mark.parametrize("kind", ["gradient", "weights"])
def test_auto_rebuilds_a_batch_from_the_first_layer_rows(digits, kind):
    """The first layer's rows give each sample whose unit fires for it alone, whatever the loss reaches them
    through: the batch rebuilt exactly, uncertified (the rows of a batch can agree on a blend)."""
    model = _model()
    x, y = digits.batch(6, seed=2)
    update = (fedleak.compute_gradient_update(model, x, y) if kind == "gradient"
              else fedleak.fedavg_update(model, x, y, lr=0.05, local_steps=2))
    rec = fedleak.reconstruct(model, update, attack="auto", budget=5)
    scores = metrics.match(rec, x, y)
    assert rec.num_certified == 0 and (scores.max_abs_error < 1e-4).sum() >= 4


@pytest.mark.parametrize("attack", ["idlg", "ig"])
def test_the_optimisation_attacks_learn_the_labels(digits, attack):
    model = _model()
    x, y = digits.batch(3, seed=4)
    update = fedleak.compute_gradient_update(model, x, y)
    rec = fedleak.reconstruct(model, update, attack=attack, iterations=5)
    assert len(rec) == 3 and any("nothing of the output layer 'fc2.weight'" in n for n in rec.notes)
    assert any("labels learned jointly" in n for n in rec.notes)
    given = fedleak.reconstruct(model, update, attack=attack, iterations=5, labels=y)
    assert torch.equal(given.labels.sort().values, y.sort().values)
    unsized = fedleak.GradientUpdate(update.gradients)
    with pytest.raises(fedleak.FedleakError, match="pass labels= and batch_size="):
        fedleak.reconstruct(model, unsized, attack=attack, iterations=5)


def test_an_audit_and_a_federation_s_server_run_auto_on_a_frozen_output_layer():
    """The audit's default attack and a federation's honest server give way to 'auto' (they ran the exact attack,
    which refused every update): one sample certified, the note naming the frozen layer."""
    from fedleak.attacks.auto import exact_route_barrier
    from fedleak.audit import AuditSettings, run_audit

    model = _model()
    assert "frozen" in exact_route_barrier(model, (1, 8, 8))
    result = run_audit(AuditSettings(data="digits", batch_sizes=(1,), trials=1, budget=2), model=model)
    assert result.batches[0].certified == 1
    assert any("the audit ran 'auto'" in n for n in result.notes)
    assert any("fc2.weight" in n for n in result.notes)
