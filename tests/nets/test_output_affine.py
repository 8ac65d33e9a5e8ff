"""Constant arithmetic on a Linear layer's output (``logits / temperature``, ``logits + log_prior``) folded into that
layer (fedleak.nets.output_affine): the exact methods read the model as its twin with the mapped weights and bias, and
certify the same samples from the client's gradient as from the twin's."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from user_models import sized_gradient

import fedleak
from fedleak.errors import ModelError
from fedleak.nets.dense_norms import fold_dense_norms


class Tempered(nn.Module):
    """A user's MLP whose logits are divided by a temperature (a number, or a learned parameter), optionally with a
    per-class gain and a log prior on them (logit adjustment) and a scaled hidden layer, ending with ``log_softmax``."""

    def __init__(self, inputs: int, classes: int, temperature: float = 2.0, learned: bool = False,
                 per_class: bool = False, hidden_scale: float | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(inputs, 256)
        self.fc2 = nn.Linear(256, classes)
        self.temperature = nn.Parameter(torch.tensor(temperature)) if learned else temperature
        self.register_buffer("gain", torch.linspace(0.5, 3.0, classes) if per_class else torch.ones(()))
        prior = torch.linspace(1.0, 3.0, classes)
        self.register_buffer("log_prior", (prior / prior.sum()).log() if per_class else torch.zeros(()))
        self.hidden_scale = hidden_scale

    def forward(self, x):
        h = self.fc1(x.view(x.size(0), -1))
        if self.hidden_scale is not None:
            h = h * self.hidden_scale
        return F.log_softmax(self.fc2(F.relu(h)) / self.temperature * self.gain + self.log_prior, dim=1)


def _twin(model: Tempered) -> nn.Sequential:
    """The same network with its scales multiplied into the weights and its log prior added to the bias."""
    hs = 1.0 if model.hidden_scale is None else model.hidden_scale
    out = (model.gain.double() / model.temperature).expand(model.fc2.out_features)
    shift = model.log_prior.double().expand(model.fc2.out_features)
    twin = nn.Sequential(nn.Flatten(), nn.Linear(model.fc1.in_features, 256), nn.ReLU(),
                         nn.Linear(256, model.fc2.out_features))
    with torch.no_grad():
        twin[1].weight.copy_(model.fc1.weight.double() * hs)
        twin[1].bias.copy_(model.fc1.bias.double() * hs)
        twin[3].weight.copy_(model.fc2.weight.double() * out[:, None])
        twin[3].bias.copy_(model.fc2.bias.double() * out + shift)
    return twin.eval()


def _nll_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sized: bool = True) -> fedleak.GradientUpdate:
    """The client's gradient of its NLL loss (its forward ends with log_softmax), with its batch size or without."""
    grads = torch.autograd.grad(F.nll_loss(model(x), y), list(model.parameters()))
    return fedleak.GradientUpdate({n: g for (n, _), g in zip(model.named_parameters(), grads)},
                                  num_examples=len(x) if sized else None)


@pytest.mark.parametrize("kind", ["temperature", "per class, prior and hidden"])
def test_a_scaled_output_certifies_what_its_twin_certifies(digits, kind):
    torch.manual_seed(0)
    options = {"per_class": True, "hidden_scale": 2.5} if kind != "temperature" else {}
    model = Tempered(64, 10, temperature=0.7, **options).eval()
    twin = _twin(model)
    x, y = digits.batch(8, seed=1)
    rec = fedleak.reconstruct(model, _nll_gradient(model, x, y))
    twin_rec = fedleak.reconstruct(twin, sized_gradient(twin, x, y))
    score = fedleak.metrics.match(rec, x, y)
    assert rec.num_certified >= 6 and score.false_certificates == 0 and int(score.exact.sum()) >= rec.num_certified
    assert rec.certified.tolist() == twin_rec.certified.tolist()
    assert torch.allclose(rec.inputs[rec.certified], twin_rec.inputs[twin_rec.certified], atol=1e-5)
    assert any("constant arithmetic" in n and "on Linear 'fc2'" in n for n in rec.notes)


def test_near_copies_with_a_scaled_output_stay_uncertified_without_their_size(lfw):
    """Two-class data, a sample and two copies moved by noise, no batch size: nothing certified, as for the twin."""
    torch.manual_seed(1)
    model = Tempered(625, 2, temperature=0.25).eval()
    x, y = lfw.batch(3, seed=4)
    x = (x[:1] + 1e-3 * torch.randn(3, *x.shape[1:], generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    y = y[:1].repeat(3)
    rec = fedleak.reconstruct(model, _nll_gradient(model, x, y, sized=False))
    assert rec.num_certified == 0 and fedleak.metrics.match(rec, x, y).false_certificates == 0


@pytest.mark.parametrize("kind", ["temperature", "per class, prior and hidden"])
def test_a_weight_change_of_a_scaled_model_certifies_what_its_twins_change_certifies(digits, kind):
    """One local step moves the folded layer by the rate times its gradient, which turns into the twin's row by row
    as a gradient does: every sample the twin's own change certifies certifies, at an unknown rate, a known one and
    with weight decay, and nothing false."""
    torch.manual_seed(2)
    options = {"per_class": True, "hidden_scale": 2.5} if kind != "temperature" else {}
    model = Tempered(64, 10, temperature=0.4, **options).eval()
    twin = _twin(model).float()
    x, y = digits.batch(8, seed=2)
    assert fold_dense_norms(model).weights_unread == ""
    for step in ({"lr": 0.1}, {"lr": 0.1, "weight_decay": 5e-3}):
        change = fedleak.fedavg_update(model, x, y, local_steps=1, **step)
        twin_change = fedleak.fedavg_update(twin, x, y, local_steps=1, **step)
        for known in (None, step["lr"]):
            rec = fedleak.reconstruct(model, replace(change, learning_rate=known), attack="exclusivity")
            twin_rec = fedleak.reconstruct(twin, replace(twin_change, learning_rate=known), attack="exclusivity")
            score = fedleak.metrics.match(rec, x, y)
            assert rec.num_certified >= 5 and score.false_certificates == 0, (step, known)
            # the twin's own step rounds at its larger weights (a W), which blurs a near-zero-loss sample's rows more
            assert bool((rec.certified | ~twin_rec.certified).all()), (step, known)
            assert int(score.recovered.sum()) == rec.num_certified


def test_a_weight_change_of_another_scale_certifies_nothing(digits):
    """The same change read with another temperature than the client's: the twin's gradient does not reproduce."""
    torch.manual_seed(2)
    model = Tempered(64, 10, temperature=0.4).eval()
    x, y = digits.batch(8, seed=2)
    change = fedleak.fedavg_update(model, x, y, lr=0.1, local_steps=1)
    model.temperature = 0.8
    rec = fedleak.reconstruct(model, change, attack="exclusivity")
    assert rec.num_certified == 0 and fedleak.metrics.match(rec, x, y).false_certificates == 0


def test_a_scaled_model_is_fished_and_its_fished_batch_certified(digits):
    torch.manual_seed(3)
    model = Tempered(64, 10, temperature=0.5).eval()
    x, y = digits.batch(10, seed=5)
    fished = fedleak.fish(model, x, y)
    assert fished.certifiable_after.all()
    rec = fedleak.reconstruct(model, _nll_gradient(model, fished.inputs, y))
    assert rec.num_certified == 10 and fedleak.metrics.match(rec, fished.inputs, y).false_certificates == 0


class Reciprocal(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        return 2.0 / self.fc2(F.relu(self.fc1(x.flatten(1))))


class ShiftWithoutBias(nn.Module):
    """A log prior added to the logits of an output layer without a bias: no bias of the twin could carry it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 10, bias=False)
        self.register_buffer("log_prior", torch.linspace(-3.0, -1.0, 10))

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x.flatten(1)))) + self.log_prior


@pytest.mark.parametrize("model, needle", [
    (Tempered(64, 10, learned=True), r"node 'truediv'.*by the trainable parameter 'temperature' \(a learned "
                                     r"temperature or scale\), which the exact methods do not read"),
    (Reciprocal(), r"node 'truediv'.*arithmetic on a layer's output here: the exact methods read only a constant "
                   r"scale or shift"),
    (ShiftWithoutBias(), r"node 'add'.*a shift where the layer has a bias"),
])
def test_what_is_not_a_constant_scale_is_refused_by_name(model, needle):
    update = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    with pytest.raises(ModelError, match=needle):
        fedleak.reconstruct(model.eval(), update)


def test_a_changed_temperature_is_folded_anew(digits):
    """The same model object with its temperature (a Python number, baked into the trace) changed between two
    attacks: the second fold is the new one (the one read first and kept certified nothing of the second)."""
    torch.manual_seed(5)
    model = Tempered(64, 10, temperature=2.0).eval()
    x, y = digits.batch(8, seed=1)
    for temperature in (2.0, 0.25):
        model.temperature = temperature
        rec = fedleak.reconstruct(model, _nll_gradient(model, x, y))
        assert rec.num_certified >= 6 and fedleak.metrics.match(rec, x, y).false_certificates == 0
        assert any(f"a scale of {1 / temperature:g}" in n for n in rec.notes)
