"""One audit job (run_audit): what the server's attack is given of a client's reply, with the learning rate it set or
without, from the exact change a client uploads or from the weights it returns."""

import copy

import pytest

from fedleak.federation import FederationSettings

pytest.importorskip("flwr")


def _replies(settings):
    """Real one-step client updates of one round (local_update: torch autograd): (model, sent, delta, M, x, y)."""
    from fedleak.federation.client import local_update
    from fedleak.federation.settings import data_split, make_model

    split = data_split(settings.data, settings.test_size, settings.public_size)
    template = make_model(settings, split)
    sent = {k: v.clone() for k, v in template.state_dict().items()}
    out = []
    for pid in range(settings.clients):
        model = copy.deepcopy(template)
        res = local_update(model, settings, pid, 1)
        out.append((copy.deepcopy(template), sent, res.delta, res.num_examples, res.inputs, res.labels))
    return out


def _audit(reply, *, uploaded, declared):
    """run_audit of one reply: the exact change uploaded with the weights, or the returned weights only."""
    import fedleak
    from fedleak.federation.audit_worker import AuditInput, AuditPlan, run_audit
    from fedleak.updates import WeightUpdate

    model, sent, delta, n, x, y = reply
    update = WeightUpdate(sent, {k: sent[k] - delta[k] for k in sent}, num_examples=n)
    job = AuditInput(1, 100, 0, model, update, delta if uploaded else None, declared)
    false = []
    record = run_audit(AuditPlan(), job, lambda _, rec: false.append(fedleak.metrics.match(rec, x, y)
                                                                     .false_certificates))
    assert false == [0]  # the attack ran, and certified no blend: scored against the client's true batch
    return record


@pytest.mark.parametrize("data", ["lfw", "fashion-mnist"])
def test_the_learning_rate_the_server_set_and_the_returned_weights_are_read(data, one_thread):
    """Per reply: the uploaded change with the rate it set certifies at least as many samples as without it, and the
    returned weights alone (their difference carries their rounding) certify samples through the weight route, where
    the change read as a gradient certified far fewer (two classes: none without the rate)."""
    import fedleak
    from fedleak.updates import GradientUpdate

    settings = FederationSettings(data=data, clients=3, batch_size=16, hidden=(1000,), seed=1)
    declared = settings.declared_training()
    assert declared["learning_rate"] == settings.lr
    unknown = {k: v for k, v in declared.items() if k != "learning_rate"}
    totals = dict.fromkeys(("delta", "delta-lr", "weights", "weights-lr", "as-gradient"), 0)
    for reply in _replies(settings):
        runs = {"delta": _audit(reply, uploaded=True, declared=unknown),
                "delta-lr": _audit(reply, uploaded=True, declared=declared),
                "weights": _audit(reply, uploaded=False, declared=unknown),
                "weights-lr": _audit(reply, uploaded=False, declared=declared)}
        assert all(r.status == "ok" for r in runs.values()), [r.detail for r in runs.values()]
        assert runs["delta-lr"].certified >= runs["delta"].certified
        for key, record in runs.items():
            totals[key] += record.certified
        model, sent, delta, n, x, y = reply  # what the audit did before: the returned weights' difference as a gradient
        change = {k: sent[k] - (sent[k] - delta[k]) for k, _ in model.named_parameters()}
        old = fedleak.reconstruct(model, GradientUpdate(change, num_examples=n), known_scale=False)
        totals["as-gradient"] += old.num_certified
    assert totals["weights-lr"] > 0 and totals["weights-lr"] >= 2 * max(1, totals["as-gradient"])
    assert totals["delta-lr"] > totals["weights-lr"]  # the exact change is read more precisely than the weights
    if data == "lfw":  # two classes: the scale pinned by the rate tells samples from blends of like ones
        assert totals["delta-lr"] > totals["delta"] and totals["weights"] == 0
    else:  # ten classes: the scale is read off the update itself
        assert totals["weights"] > 0


def test_the_learning_rate_is_a_declared_fact_unless_the_server_ignores_it():
    settings = FederationSettings(lr=0.05, local_steps=2)
    assert settings.declared_training() == {"local_steps": 2, "batch_size": 16, "learning_rate": 0.05}
    ignored = FederationSettings(lr=0.05, lr_known=False, local_epochs=1)
    assert "learning_rate" not in ignored.declared_training()
    assert FederationSettings.from_json(ignored.to_json()) == ignored



def test_returned_weights_of_a_model_with_batchnorm_on_a_linear_layer_are_still_attacked(digits):
    """The weight route does not read a BatchNorm1d on a Linear layer's features: such a model's returned weights
    are read as before (their difference as a gradient), not refused."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from fedleak.federation.audit_worker import AuditInput, AuditPlan, run_audit
    from fedleak.updates import WeightUpdate

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 10))
    with torch.no_grad():
        model.train()(digits.x[:256])  # its running statistics
    model.eval()
    x, y = digits.batch(8, seed=0)
    client = copy.deepcopy(model)
    torch.optim.SGD(client.parameters(), lr=0.1).zero_grad()
    F.cross_entropy(client(x), y).backward()
    torch.optim.SGD(client.parameters(), lr=0.1).step()
    update = WeightUpdate(model.state_dict(), client.state_dict(), num_examples=8)
    record = run_audit(AuditPlan(), AuditInput(1, 100, 0, model, update, None, {"learning_rate": 0.1}), None)
    assert record.status == "ok" and record.attack == "exclusivity", record.detail
