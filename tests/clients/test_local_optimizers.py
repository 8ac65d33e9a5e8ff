"""A defended client's local optimizers (fedleak.clients.local_optimizers): SGD with momentum and weight decay,
torch's SGD step, and a federation of such clients audited as Flower's quickstart clients train; Adam, torch's Adam
step, and a federation of Adam clients whose audit says why nothing is rebuilt."""

import copy

import pytest
import torch
from torch.nn import functional as F

import fedleak
from fedleak.clients.defended import defended_local_round
from fedleak.clients.local_optimizers import CLIENT_OPTIMIZERS, LocalAdam, LocalSGD
from fedleak.defenses.stack import DefenseStack
from fedleak.errors import FedleakError


def _torch_sgd(sgd: LocalSGD, lr: float):
    return lambda p: torch.optim.SGD(p, lr=lr, momentum=sgd.momentum, weight_decay=sgd.weight_decay,
                                     nesterov=sgd.nesterov)


def _torch_adam(adam: LocalAdam, lr: float):
    return lambda p: torch.optim.Adam(p, lr=lr, betas=adam.betas, eps=adam.eps, weight_decay=adam.weight_decay)


@pytest.mark.parametrize("ours, theirs, lr", [
    *((sgd, _torch_sgd(sgd, 0.1), 0.1) for sgd in (LocalSGD(), LocalSGD(0.9), LocalSGD(0.9, 5e-4),
                                                    LocalSGD(0.9, 5e-4, nesterov=True), LocalSGD(0.0, 1e-2))),
    *((adam, _torch_adam(adam, 0.01), 0.01) for adam in (LocalAdam(), LocalAdam(weight_decay=1e-2),
                                                         LocalAdam(betas=(0.8, 0.99), eps=1e-6))),
])
def test_the_clients_steps_are_torchs(digits, ours, theirs, lr):
    torch.manual_seed(0)
    model = fedleak.make_mlp((1, 8, 8), [64], 10)
    batches = [digits.batch(8, seed=s) for s in range(3)]
    mine = copy.deepcopy(model)
    defended_local_round(mine, batches, DefenseStack(()), lr=lr, generator=torch.Generator().manual_seed(0),
                         optimizer=ours)
    reference = copy.deepcopy(model)
    opt = theirs(reference.parameters())
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        opt.step()
    for (name, a), b in zip(mine.named_parameters(), reference.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), name


@pytest.mark.parametrize("bad", [{"momentum": -0.1}, {"weight_decay": float("inf")}, {"nesterov": True}])
def test_a_bad_sgd_setting_is_refused(bad):
    with pytest.raises(FedleakError, match="momentum|weight_decay|Nesterov"):
        LocalSGD(**bad)


def _audited(lr: float, **clients):
    """One client's local round in a digits federation of ``clients`` settings, audited by the honest server (the
    uploaded change over the rate it set); with the false certificates against what the client trained on."""
    pytest.importorskip("flwr")
    from fedleak.federation import FederationSettings
    from fedleak.federation.audit_worker import AuditInput, AuditPlan, run_audit
    from fedleak.federation.client import local_update
    from fedleak.federation.settings import data_split, make_model
    from fedleak.updates import WeightUpdate

    settings = FederationSettings(data="digits", clients=2, batch_size=8, lr=lr, test_size=200, public_size=100,
                                  audit_mode="sync", **clients)
    split = data_split(settings.data, settings.test_size, settings.public_size)
    template = make_model(settings, split)
    sent = {k: v.clone() for k, v in template.state_dict().items()}
    res = local_update(copy.deepcopy(template), settings, 0, 1)
    update = WeightUpdate(sent, {k: sent[k] - res.delta[k] for k in sent}, num_examples=res.num_examples)
    false = []
    record = run_audit(AuditPlan(), AuditInput(1, 100, 0, template, update, res.delta, {"learning_rate": lr}),
                       lambda _, rec: false.append(fedleak.metrics.match(rec, res.inputs, res.labels)
                                                   .false_certificates))
    return record, res.num_examples, false


def test_one_local_step_with_momentum_and_weight_decay_is_certified():
    record, n, false = _audited(0.1, momentum=0.9, weight_decay=5e-4)
    assert false == [0] and record.certified == n


@pytest.mark.parametrize("bad, match", [({"betas": (0.9, 1.0)}, "betas"), ({"eps": -1.0}, "eps"),
                                        ({"weight_decay": float("nan")}, "weight_decay")])
def test_a_bad_adam_setting_is_refused(bad, match):
    with pytest.raises(FedleakError, match=match):
        LocalAdam(**bad)


def test_the_federations_optimizer_is_read_by_name():
    pytest.importorskip("flwr")
    from fedleak.federation import FederationSettings

    assert isinstance(FederationSettings(data="digits", optimizer="adam", weight_decay=1e-2).local_optimizer, LocalAdam)
    assert FederationSettings(data="digits", momentum=0.9).local_optimizer == LocalSGD(0.9)
    with pytest.raises(FedleakError, match="unknown client optimizer 'rmsprop'; available: adam, sgd"):
        FederationSettings(data="digits", optimizer="rmsprop")
    with pytest.raises(FedleakError, match="momentum of 0.9 is SGD's"):
        FederationSettings(data="digits", optimizer="adam", momentum=0.9)
    assert CLIENT_OPTIMIZERS.names() == ["adam", "sgd"]


def test_one_local_step_of_adam_is_audited_as_an_adaptive_step_not_as_clipping():
    """The uploaded change over the rate the server set is read as a gradient: every entry about ±1, a few exactly;
    the audit said it was clipped by value at ±1, and now names the adaptive optimizer."""
    record, _, _ = _audited(0.01, optimizer="adam")
    assert record.status == "ok" and record.certified == 0
    assert "adaptive optimizer" in record.reason and "clipped by value" not in record.reason
