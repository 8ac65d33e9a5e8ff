"""An audit of clients that train with another loss than the plain cross-entropy (label smoothing, class weights, a
focal loss): their gradients are of that loss, the attack is told, and what cannot carry it is refused up front."""

import pytest
import torch

import fedleak
from fedleak.audit import AuditSettings, run_audit
from fedleak.client_loss import ClientLoss
from fedleak.defenses.stack import DefenseStack, defended_gradient
from fedleak.errors import FedleakError, OptionError

SMALL = {"data": "digits", "widths": (256,), "batch_sizes": (1, 4), "trials": 2, "seed": 0}


@pytest.mark.parametrize("loss", [{"label_smoothing": 0.1}, {"focal_gamma": 2.0},
                                  {"class_weights": tuple(1.0 + 0.5 * k for k in range(10))}],
                         ids=["label_smoothing", "focal_gamma", "class_weights"])
def test_an_audit_of_clients_with_another_loss_certifies_their_batches(loss):
    settings = AuditSettings(**SMALL, **loss)
    result = run_audit(settings)
    assert sum(b.recovered for b in result.batches) >= 8 and not any(b.false_certificates for b in result.batches)
    assert settings.to_dict()[next(iter(loss))] == (list(loss["class_weights"]) if "class_weights" in loss
                                                    else next(iter(loss.values())))
    assert any(ClientLoss(**loss).describe() in n for n in result.notes)


def test_the_clients_gradient_is_of_their_loss():
    digits = fedleak.load_dataset("digits")
    model = fedleak.make_mlp(digits.input_shape, [64], 10, seed=0)
    x, y = digits.batch(4, seed=0)
    sent = defended_gradient(model, x, y, loss=ClientLoss(label_smoothing=0.2)).update.gradients
    want = fedleak.compute_gradient_update(model, x, y, label_smoothing=0.2).gradients
    plain = defended_gradient(model, x, y).update.gradients
    for name, g in sent.items():
        assert torch.allclose(g, want[name], atol=1e-7) and not torch.allclose(g, plain[name], atol=1e-7)


def test_what_cannot_carry_the_clients_loss_is_refused_before_anything_runs():
    with pytest.raises(FedleakError, match=r"'trap-weights' reads a plain cross-entropy's update.*exclusivity"):
        AuditSettings(**SMALL, attack="trap-weights", label_smoothing=0.1)
    with pytest.raises(OptionError, match=r"step defense 'dp-sgd' .* plain cross-entropy"):
        AuditSettings(**SMALL, defenses=("dp-sgd:noise_multiplier=0.5,max_grad_norm=1",), focal_gamma=2.0)
    with pytest.raises(FedleakError, match="focal_gamma with label_smoothing"):
        AuditSettings(**SMALL, label_smoothing=0.1, focal_gamma=2.0)
    assert AuditSettings(**SMALL).loss.plain and AuditSettings(**SMALL).to_dict()["class_weights"] is None
    stack = DefenseStack.of("dp-sgd:noise_multiplier=0.5,max_grad_norm=1")
    digits = fedleak.load_dataset("digits")
    model = fedleak.make_mlp(digits.input_shape, [64], 10, seed=0)
    with pytest.raises(OptionError, match="per-sample gradients of the plain cross-entropy"):
        stack.gradient(model, *digits.batch(2, seed=0), torch.Generator(), ClientLoss(label_smoothing=0.1))
