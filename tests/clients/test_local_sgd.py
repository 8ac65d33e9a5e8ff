"""A defended client's SGD with momentum and weight decay (fedleak.clients.defended.LocalSGD): torch's SGD step, and
a federation of such clients audited as Flower's quickstart clients train."""

import copy

import pytest
import torch
from torch.nn import functional as F

import fedleak
from fedleak.clients.defended import LocalSGD, defended_local_round
from fedleak.defenses.stack import DefenseStack
from fedleak.errors import FedleakError


@pytest.mark.parametrize("sgd", [LocalSGD(), LocalSGD(0.9), LocalSGD(0.9, 5e-4), LocalSGD(0.9, 5e-4, nesterov=True),
                                 LocalSGD(0.0, 1e-2)])
def test_the_clients_steps_are_torchs_sgd(digits, sgd):
    torch.manual_seed(0)
    model = fedleak.make_mlp((1, 8, 8), [64], 10)
    batches = [digits.batch(8, seed=s) for s in range(3)]
    ours = copy.deepcopy(model)
    defended_local_round(ours, batches, DefenseStack(()), lr=0.1, generator=torch.Generator().manual_seed(0),
                         sgd=sgd)
    theirs = copy.deepcopy(model)
    opt = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=sgd.momentum, weight_decay=sgd.weight_decay,
                          nesterov=sgd.nesterov)
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(theirs(x), y).backward()
        opt.step()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), name


@pytest.mark.parametrize("bad", [{"momentum": -0.1}, {"weight_decay": float("inf")}, {"nesterov": True}])
def test_a_bad_sgd_setting_is_refused(bad):
    with pytest.raises(FedleakError, match="momentum|weight_decay|Nesterov"):
        LocalSGD(**bad)


def test_one_local_step_with_momentum_and_weight_decay_is_certified(digits):
    pytest.importorskip("flwr")
    from fedleak.federation import FederationSettings
    from fedleak.federation.audit_worker import AuditInput, AuditPlan, run_audit
    from fedleak.federation.client import local_update
    from fedleak.federation.settings import data_split, make_model
    from fedleak.updates import WeightUpdate

    settings = FederationSettings(data="digits", clients=2, batch_size=8, momentum=0.9, weight_decay=5e-4,
                                  test_size=200, public_size=100, audit_mode="sync")
    split = data_split(settings.data, settings.test_size, settings.public_size)
    template = make_model(settings, split)
    sent = {k: v.clone() for k, v in template.state_dict().items()}
    res = local_update(copy.deepcopy(template), settings, 0, 1)
    update = WeightUpdate(sent, {k: sent[k] - res.delta[k] for k in sent}, num_examples=res.num_examples)
    false = []
    record = run_audit(AuditPlan(), AuditInput(1, 100, 0, template, update, res.delta, {"learning_rate": 0.1}),
                       lambda _, rec: false.append(fedleak.metrics.match(rec, res.inputs, res.labels)
                                                   .false_certificates))
    assert false == [0] and record.certified == res.num_examples
