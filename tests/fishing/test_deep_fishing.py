"""Fishing deep MLPs (two and three hidden ReLU layers, and a user-written nn.Module): every sample of the batch
is certifiable after fishing and the exact attack rebuilds every one of them, with no false certificate."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fedleak
from fedleak.fishing import fish


def _attack_scores(model, inputs, labels):
    rec = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, inputs, labels))
    return fedleak.metrics.match(rec, inputs, labels)


def _hidden_preacts(model: nn.Module, inputs: torch.Tensor) -> list[torch.Tensor]:
    """float64 pre-activations of every hidden layer (the Linear layers in order, ReLU between them)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    a = inputs.reshape(len(inputs), -1).double()
    out = []
    for lin in linears[:-1]:
        z = a @ lin.weight.detach().double().T + lin.bias.detach().double()
        out.append(z)
        a = z.clamp(min=0)
    return out


class UserNet(nn.Module):
    """Written the way users write it: F.relu and x.view(x.size(0), -1), two hidden layers."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 256)
        self.fc2 = nn.Linear(256, 128)
        self.fc3 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(x.size(0), -1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


@pytest.fixture(scope="module")
def two_hidden(fashion):
    model = fedleak.make_mlp(fashion.input_shape, [512, 128], 10, seed=0)
    x, y = fashion.batch(32, seed=1)
    return model, x, y, fish(model, x, y, workers=1)


def test_two_hidden_layers_every_sample_fished(two_hidden):
    model, x, y, res = two_hidden
    assert res.fished_fraction == 1.0
    assert not res.certifiable_before.all()  # fishing had work to do
    assert all(s.status == "fished" and s.perturbed for s in res.samples)
    # targets: targets_other=1 on the first hidden layer, targets_last=2 on the last
    assert all([len(t) for t in s.targets] == [1, 2] for s in res.samples)
    for h in range(2):
        owned = [j for s in res.samples for j in s.targets[h]]
        assert len(owned) == len(set(owned))  # disjoint across samples on every layer
    assert res.inputs.shape == x.shape and float(res.inputs.min()) >= 0.0 and float(res.inputs.max()) <= 1.0


def test_two_hidden_layers_targets_hold_in_float32(two_hidden):
    model, x, y, res = two_hidden
    kappa = res.kappa
    a = res.inputs.reshape(len(x), -1)  # float32, as the client computes
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for h, lin in enumerate(linears[:-1]):
        z = a @ lin.weight.detach().T + lin.bias.detach()
        for s in res.samples:
            for j in s.targets[h]:
                col = z[:, j]
                assert float(col[s.index]) >= 0.5 * kappa
                assert float(torch.cat([col[: s.index], col[s.index + 1:]]).max()) <= -0.5 * kappa
        a = z.clamp(min=0)


def test_two_hidden_layers_attack_recovers_everything(two_hidden):
    model, x, y, res = two_hidden
    m = _attack_scores(model, res.inputs, y)
    assert m.recovered_fraction == 1.0
    assert int(m.false_certificate.sum()) == 0


def test_two_hidden_layers_first_layer_clear_of_zero(two_hidden):
    model, x, y, res = two_hidden
    z1 = _hidden_preacts(model, res.inputs)[0]
    assert float(z1.abs().min()) > 1e-6


def test_three_hidden_layers(fashion):
    model = fedleak.make_mlp(fashion.input_shape, [512, 256, 128], 10, seed=0)
    x, y = fashion.batch(16, seed=1)
    res = fish(model, x, y, workers=1)
    assert res.fished_fraction == 1.0 and not res.certifiable_before.all()
    assert all([len(t) for t in s.targets] == [1, 1, 2] for s in res.samples)
    m = _attack_scores(model, res.inputs, y)
    assert m.recovered_fraction == 1.0 and int(m.false_certificate.sum()) == 0
    assert float(_hidden_preacts(model, res.inputs)[0].abs().min()) > 1e-6


def test_user_written_module(fashion):
    torch.manual_seed(0)
    net = UserNet()
    x, y = fashion.batch(16, seed=1)
    res = fish(net, x, y, workers=1)
    assert res.fished_fraction == 1.0 and not res.certifiable_before.any()
    assert all([len(t) for t in s.targets] == [1, 2] for s in res.samples)
    m = _attack_scores(net, res.inputs, y)
    assert m.recovered_fraction == 1.0 and int(m.false_certificate.sum()) == 0
    # the same weights as an nn.Sequential are fished identically
    twin = nn.Sequential(nn.Flatten(), net.fc1, nn.ReLU(), net.fc2, nn.ReLU(), net.fc3)
    assert torch.equal(fish(twin, x, y, workers=1).inputs, res.inputs)
