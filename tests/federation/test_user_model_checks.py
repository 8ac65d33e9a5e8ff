"""AuditFedAvg's checks of a model as users write it, made once, when the strategy is built: the template it
traces (kept whole, and shipped to the audit worker process without the user's class), the models and scorers it
refuses up front, and the attack the honest server picks for a model the exact attack cannot read.
"""

import pickle

import pytest
import torch
from torch import fx, nn
from torch.nn import functional as F
from user_models import DropoutMLP, FlowerNet, LayerNormMLP, ResidualMLP, in_main

import fedleak
from fedleak.errors import FedleakError, ModelError

pytest.importorskip("flwr")

from fedleak.federation.strategy import AuditFedAvg, AuditPlan, needs_relu_network  # noqa: E402

EXACT_ATTACKS = ("exclusivity", "trap-weights", "imprint")  # the attacks that need a ReLU network


def test_template_pickles_without_the_users_class():
    class LocalNet(FlowerNet):  # a class pickle cannot find by name
        pass

    model = LocalNet().eval()
    with pytest.raises((pickle.PicklingError, AttributeError)):
        pickle.dumps(model)
    strategy = AuditFedAvg(model, AuditPlan("exclusivity", {"known_scale": False}), audit_mode="sync")
    copy = pickle.loads(pickle.dumps(strategy.template))
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(copy(x), model(x))
    assert type(strategy.model) is LocalNet  # a tamper function still gets the user's own class


class SpareLayerMLP(DropoutMLP):
    """Holds a layer and a buffer its forward never reads: tracing drops them, Flower still sends them."""

    def __init__(self) -> None:
        super().__init__(64, 16, 10)
        self.spare = nn.Sequential(nn.Linear(3, 2))
        self.register_buffer("seen", torch.zeros(1))


def test_template_keeps_unused_weights_and_the_input_shape():
    model = SpareLayerMLP().eval()
    strategy = AuditFedAvg(model, AuditPlan("exclusivity", {"known_scale": False}), audit_mode="sync")
    assert "spare.0.weight" not in fx.symbolic_trace(model).state_dict()  # what tracing alone would lose
    strategy.template.load_state_dict(model.state_dict())  # strict: every key the model has is there
    mlp = fedleak.make_mlp((1, 8, 8), [16], 10)  # fedleak's builders record the input shape
    assert AuditFedAvg(mlp, AuditPlan("exclusivity", {}), audit_mode="sync").template.input_shape == (1, 8, 8)


@pytest.mark.parametrize("attack", EXACT_ATTACKS)
def test_exact_attacks_are_flagged(attack):
    assert needs_relu_network(attack)
    assert not needs_relu_network("ig") and not needs_relu_network("auto")


@pytest.mark.parametrize("model, node", [(ResidualMLP(), r"node 'add' \(operator.add\) joins 2 branches"),
                                         (LayerNormMLP(), r"node 'norm' \(LayerNorm\): not supported")])
@pytest.mark.parametrize("attack", EXACT_ATTACKS)
def test_unsupported_model_is_refused_up_front_for_exact_attacks(model, node, attack):
    with pytest.raises(ModelError, match=rf"'{attack}' attack cannot run on this model: {node}") as info:
        AuditFedAvg(model, AuditPlan(attack, {}), audit_mode="sync")
    assert "\n" not in str(info.value)
    AuditFedAvg(model, AuditPlan("ig", {}), audit_mode="process").close()  # the optimisation attacks need autograd
    AuditFedAvg(model, AuditPlan("auto", {}), audit_mode="sync")  # auto falls back to them


class DataDependentNet(nn.Module):
    """A forward torch.fx cannot trace (its control flow reads the data)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else self.fc(-x)


def test_untraceable_model(monkeypatch):
    with pytest.raises(ModelError, match="could not trace DataDependentNet.forward with torch.fx"):
        AuditFedAvg(DataDependentNet(), AuditPlan("exclusivity", {}), audit_mode="sync")
    # the optimisation attacks run on a plain copy; in a worker process only if it can get there
    assert type(AuditFedAvg(DataDependentNet(), AuditPlan("ig", {}), audit_mode="process").template) is DataDependentNet
    script_cls = in_main(DataDependentNet, monkeypatch)
    with pytest.raises(FedleakError, match=r"defined in the script being run \(__main__\).*audit_mode='thread'"):
        AuditFedAvg(script_cls(), AuditPlan("ig", {}), audit_mode="process")
    assert type(AuditFedAvg(script_cls(), AuditPlan("ig", {}), audit_mode="thread").template) is script_cls


def test_unpicklable_scorer_is_refused_up_front_in_process_mode():
    model = DropoutMLP(64, 16, 10).eval()
    with pytest.raises(FedleakError, match=r"the scorer cannot be sent to the audit worker process .*: it cannot be "
                                           r"pickled"):
        AuditFedAvg(model, AuditPlan("ig", {}), audit_mode="process", scorer=lambda job, rec: None)
    AuditFedAvg(model, AuditPlan("ig", {}), audit_mode="sync", scorer=lambda job, rec: None)


def test_the_honest_server_audits_a_model_the_exact_attack_cannot_read_with_auto():
    """A LayerNorm or residual model is federated and audited (it was refused): the honest server runs auto,
    whose first-layer route certifies one-sample updates and whose IG searches the rest within attack_budget;
    a ReLU MLP keeps the exclusivity attack, and a malicious server its own."""
    from fedleak.federation import FederationSettings
    from fedleak.federation.hooks import audit_attack, get_threat

    settings = FederationSettings(attack_budget=7.0)
    honest = get_threat("honest")
    for model in (LayerNormMLP(), ResidualMLP()):
        chosen = audit_attack(honest, settings, model, (16,))
        assert chosen.name == "auto" and chosen.options == {"budget": 7.0, "progress": False, "input_shape": (16,),
                                                            "data_range": (0.0, 1.0)}
        AuditFedAvg(model, AuditPlan(chosen.name, chosen.options), audit_mode="sync")  # not refused
    mlp = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    assert audit_attack(honest, settings, mlp, (16,)).name == "exclusivity"
    # the exact attack reads these but certifies nothing from their updates: max-pooled conv layers (Flower's
    # quickstart Net), Dropout in clients that train in training mode (not in eval mode)
    flower = audit_attack(honest, settings, FlowerNet().eval(), (3, 32, 32), (-1.0, 1.0))  # its data normalised
    assert flower.name == "auto" and flower.options["data_range"] == (-1.0, 1.0)  # IG searches there, not in [0, 1]
    dropout = DropoutMLP(16, 32, 3).eval()
    assert audit_attack(honest, settings, dropout, (16,)).name == "auto"
    evaluated = FederationSettings(attack_budget=7.0, client_mode="eval")
    assert audit_attack(honest, evaluated, dropout, (16,)).name == "exclusivity"
    assert audit_attack(honest, settings, mlp, (16,), (-1.0, 1.0)).options["data_range"] == (-1.0, 1.0)
    trap = audit_attack(get_threat("trap-weights"), settings, LayerNormMLP(), (16,), (-1.0, 1.0))
    assert trap.name == "trap-weights" and "data_range" not in trap.options  # it does not read the range
    fishing = audit_attack(get_threat("class-fishing"), settings, DropoutMLP(16, 32, 3).eval(), (16,), (-2.0, 2.0))
    assert fishing.name == "class-fishing" and fishing.options["data_range"] == (-2.0, 2.0)


class WrittenFreely(nn.Module):
    """``x.float()``, ``len(x)``, ``forward(self, x, labels=None)`` and a head the forward never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 10)
        self.aux = nn.Linear(32, 2)

    def forward(self, x, labels=None):
        logits = self.fc2(torch.relu(self.fc1(x.float().view(len(x), -1))))
        return logits if labels is None else F.cross_entropy(logits, labels)


def test_the_template_traces_forwards_as_the_exact_methods_read_them():
    """The template is the traced graph (not the plain-copy fallback), ships to the worker, and computes the same."""
    model = WrittenFreely().eval()
    strategy = AuditFedAvg(model, AuditPlan("exclusivity", {}), audit_mode="process")
    assert isinstance(strategy.template, fx.GraphModule)
    strategy.template.load_state_dict(model.state_dict())  # strict: the unused head's weights are there
    shipped = pickle.loads(pickle.dumps(strategy.template))
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(shipped(x), model(x))
