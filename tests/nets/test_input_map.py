"""A normalisation inside ``forward``: read as an elementwise affine map, peeled off for the exact methods and
inverted on what they rebuild (fedleak.nets.input_peel, fedleak.nets.input_map)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from user_models import sized_gradient

import fedleak
from fedleak.errors import ModelError
from fedleak.nets.exact_view import exact_network, first_layer_view
from fedleak.nets.input_peel import _PEELED, peel_input_map


class Normalised(nn.Module):
    """A user's MLP on 8 x 8 images whose forward starts with ``arithmetic`` (a function of x)."""

    def __init__(self, arithmetic, hidden: int = 256) -> None:
        super().__init__()
        self.arithmetic = arithmetic
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x):
        x = self.arithmetic(x)
        return self.fc2(F.relu(self.fc1(x.view(x.size(0), -1))))


class Buffers(nn.Module):
    """``(x - self.mean) / self.std`` with buffers, per value when ``per_value``; then ``torch.flatten``."""

    def __init__(self, per_value: bool = False) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        shape = (1, 8, 8) if per_value else ()
        self.register_buffer("mean", torch.rand(shape, generator=gen) * 0.5 if per_value else torch.tensor(0.3))
        self.register_buffer("std", 0.2 + torch.rand(shape, generator=gen) if per_value else torch.tensor(0.35))
        self.fc1 = nn.Linear(64, 256)
        self.fc2 = nn.Linear(256, 10)

    def forward(self, x):
        x = (x - self.mean) / self.std
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


ARITHMETIC = {
    "(x - 0.5) / 0.25": lambda x: (x - 0.5) / 0.25,
    "x * 255": lambda x: x * 255.0,
    "x.sub(0.1307).div(0.3081)": lambda x: x.sub(0.1307).div(0.3081),
    "2 * x - 1": lambda x: 2 * x - 1,
    "1 - x": lambda x: 1 - x,
}


def _gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    return {n: g for (n, _), g in zip(model.named_parameters(), grads)}


def _models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    models = {name: Normalised(fn) for name, fn in ARITHMETIC.items()}
    models["buffers"] = Buffers()
    models["buffers per value"] = Buffers(per_value=True)
    return {name: m.eval() for name, m in models.items()}


@pytest.mark.parametrize("name", [*ARITHMETIC, "buffers", "buffers per value"])
def test_the_exact_attack_rebuilds_the_model_inputs_through_a_normalisation_inside_forward(digits, name):
    """Certified, and every certified input is the sent image itself (pixels), not its normalised value."""
    model = _models()[name]
    x, y = digits.batch(6, seed=3)
    shape = (1, 8, 8) if name == "buffers per value" else None  # a mean per pixel takes images, not rows
    rec = fedleak.reconstruct(model, _gradient(model, x, y), input_shape=shape, num_examples=len(x))
    assert rec.inputs.shape[1:] == (shape or (64,))  # else what the model reads (x.view(x.size(0), -1))
    assert rec.num_certified >= 4
    result = fedleak.metrics.match(rec, x, y, data_range=digits.value_range)
    assert result.false_certificates == 0 and result.n_certified == rec.num_certified
    assert any("maps its input before its first layer" in n for n in rec.notes)
    worst = max(float((rec.inputs[i].reshape(1, -1) - x.flatten(1)).abs().amax(1).min()) for i in range(len(rec))
                if rec.certified[i])
    assert worst < 1e-5


def test_a_fedavg_update_of_a_normalising_model_is_read_too(digits):
    torch.manual_seed(1)
    model = Buffers().eval()
    x, y = digits.batch(4, seed=5)
    update = fedleak.fedavg_update(model, x, y, lr=0.1, local_steps=1)
    rec = fedleak.reconstruct(model, update)
    result = fedleak.metrics.match(rec, x, y, data_range=digits.value_range)
    assert rec.num_certified >= 2 and result.false_certificates == 0 and result.exact.sum() >= rec.num_certified


def test_auto_takes_the_exact_route_on_a_normalising_model(digits):
    model = _models()["(x - 0.5) / 0.25"]
    x, y = digits.batch(4, seed=2)
    rec = fedleak.reconstruct(model, _gradient(model, x, y), attack="auto", budget=5, num_examples=len(x))
    assert not any("exact route skipped" in n for n in rec.notes)
    assert rec.num_certified >= 3
    assert fedleak.metrics.match(rec, x, y, data_range=digits.value_range).false_certificates == 0


def test_the_map_peeled_is_the_forward_s_own(digits):
    """The stripped model on what the first layer reads gives the model's logits; the map inverts; the stripped
    model shares the model's modules (its weights stay live) and is read once per structure."""
    model = _models()["buffers per value"]
    x, _ = digits.batch(5, seed=0)
    with pytest.raises(ModelError, match=r"arithmetic on its input does not run on inputs of shape \(64,\).*pass "
                                         "input_shape="):
        peel_input_map(model)  # the first layer says 64 values; the per-pixel mean needs 1 x 8 x 8 images
    stripped, input_map = peel_input_map(model, inputs=x)
    assert input_map is not None and not input_map.uniform and input_map.written == ("sub", "truediv")
    z = input_map.to_first_layer(x)
    assert torch.equal(stripped(z), model(x))
    assert float((input_map.to_inputs(z) - x).abs().max()) < 1e-6
    assert stripped.fc1 is model.fc1 and [n for n, _ in stripped.named_parameters()] == [
        n for n, _ in model.named_parameters()]
    assert peel_input_map(model, inputs=x)[0] is stripped
    with torch.no_grad():
        model.mean.add_(0.1)  # a buffer changed in place: the map is read again, the structure is not
    again = peel_input_map(model, inputs=x)[1]
    assert torch.allclose(again.shift, input_map.shift - 0.1 / model.std.flatten().double())


def test_a_model_without_input_arithmetic_is_left_as_it_is(digits):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    x, _ = digits.batch(3, seed=0)
    assert peel_input_map(model) == (model, None)
    assert first_layer_view(model, x)[1] is x


def test_the_cache_does_not_keep_the_model_alive():
    model = _models()["buffers"]
    peel_input_map(model)
    assert model in _PEELED
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


def test_exclusivity_analysis_and_the_plan_read_what_the_first_layer_reads(digits):
    model = _models()["(x - 0.5) / 0.25"]
    stripped, input_map = peel_input_map(model)
    x, y = digits.batch(8, seed=4)
    report = fedleak.analyze_exclusivity(model, x, y)
    twin = fedleak.analyze_exclusivity(stripped, input_map.to_first_layer(x), y)
    assert report.certifiable.tolist() == twin.certifiable.tolist()
    plan = fedleak.plan(model, inputs=(x, y), batch_sizes=4)
    assert "cannot read the model" not in plan.verdict and any("maps its input" in n for n in plan.notes)
    assert exact_network(model).input_shape == (64,)


class Learned(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.fc1 = nn.Linear(64, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1((x * self.scale).flatten(1))))


class Broadcast(nn.Module):
    """A mean of 3 channels subtracted from flat inputs (its first layer says 192 values): 192 values become 576."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1))
        self.fc1 = nn.Linear(192, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(torch.flatten(x - self.mean, 1))))


@pytest.mark.parametrize("model, needle", [
    (Learned(), r"node 'mul' scales or shifts the model's input by the trainable parameter 'scale'.*register_buffer"),
    (Normalised(lambda x: 2.0 / x), r"node 'truediv' divides by the model's input"),
    (Normalised(lambda x: x * 0.0), r"not invertible \(a scale of 0"),
    (Broadcast(), r"turns 192 values, read as inputs of shape \(192,\), into 576 \(a constant broadcast beyond "
                  r"that shape.*pass input_shape="),
])
def test_arithmetic_that_is_not_an_invertible_map_with_constants_is_refused_by_name(model, needle):
    update = {n: torch.zeros_like(p) for n, p in model.named_parameters()}  # refused before it is read
    with pytest.raises(ModelError, match=needle):
        fedleak.reconstruct(model.eval(), update)


def test_a_per_channel_mean_on_an_mlp_is_read_with_the_input_shape_the_refusal_asks_for():
    """The refusal above names what to pass: with ``input_shape=(3, 8, 8)`` the per-channel mean maps each value."""
    torch.manual_seed(0)
    model = Broadcast().eval()
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([4])
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    update = fedleak.GradientUpdate({n: g for (n, _), g in zip(model.named_parameters(), grads)}, num_examples=1)
    rec = fedleak.reconstruct(model, update, input_shape=(3, 8, 8))
    assert rec.num_certified == 1 and rec.inputs.shape == (1, 3, 8, 8)
    assert float((rec.inputs - x).abs().max()) < 1e-4


def test_rounding_the_arithmetic_loses_is_not_certified(digits):
    """``(x + 1e4) - 1e4`` is the identity in exact arithmetic, but float32 may round a value by up to 1e-3 there
    (the digits' sixteenths happen to survive it; the bound cannot know that): what the first layer read is
    certified, the image is not (the reason says so instead of claiming it)."""
    torch.manual_seed(2)
    model = Normalised(lambda x: (x + 1e4) - 1e4).eval()
    x, y = digits.batch(4, seed=1)
    rec = fedleak.reconstruct(model, _gradient(model, x, y), num_examples=len(x))
    assert len(rec) >= 4 and rec.num_certified == 0
    assert "rounds it by up to" in rec.why_uncertified()
    assert fedleak.metrics.match(rec, x, y, data_range=digits.value_range).false_certificates == 0


def test_a_malicious_first_layer_says_it_does_not_read_the_arithmetic(digits):
    model = _models()["buffers"]
    with pytest.raises(ModelError, match=r"arithmetic on the model's input .*is not read here .*a malicious server's "
                                         r"first layer does not\): normalise the data instead"):
        fedleak.trap_weights(model)


def test_an_in_place_normalisation_leaves_the_caller_s_inputs_alone(digits):
    torch.manual_seed(3)
    model = Normalised(lambda x: x.sub_(0.5).div_(0.25)).eval()
    x, y = digits.batch(4, seed=6)
    kept = x.clone()
    report = fedleak.analyze_exclusivity(model, x, y)
    assert torch.equal(x, kept) and len(report.certifiable) == 4
    rec = fedleak.reconstruct(model, _gradient(model, x.clone(), y), num_examples=len(x))
    assert rec.num_certified >= 3 and fedleak.metrics.match(rec, x, y).false_certificates == 0


def test_a_near_uniform_image_is_held_to_the_data_range_when_given(digits):
    """An image whose values span 0.01 (0.9 + 0.01 x) in a batch: the rounding of ``(x - 0.5) / 0.25`` is more
    than its share of 1e-4 of that span, so it is not certified, and its reason names data_range=; given the
    data's range, the rounding is within its share of it and the certificate stands."""
    torch.manual_seed(4)
    model = Normalised(lambda x: (x - 0.5) / 0.25).eval()
    x, y = digits.batch(4, seed=7)
    x[0] = 0.9 + 0.01 * x[0]
    update = fedleak.GradientUpdate(_gradient(model, x, y), num_examples=len(x))
    flat = x.flatten(1)

    def uniform(rec):  # the rebuilt image of the near-uniform one
        return next(i for i in range(len(rec)) if float((rec.inputs[i] - flat[0]).abs().max()) < 1e-6)

    own = fedleak.reconstruct(model, update)
    k = uniform(own)
    assert not own.certified[k] and "data_range= (the data's)" in own.samples[k].reason
    assert own.num_certified >= 2
    held = fedleak.reconstruct(model, update, data_range=(0.0, 1.0))
    assert held.certified[uniform(held)] and held.num_certified == own.num_certified + 1
    assert fedleak.metrics.match(held, x, y, data_range=(0.0, 1.0)).false_certificates == 0


def test_the_first_layer_attack_reads_through_a_normalisation(digits):
    """One sample's gradient: certified and the sent image in pixels; a FedAvg change of 3 local steps: its first
    layer's rows, uncertified, exact in pixels."""
    torch.manual_seed(5)
    model = _models()["buffers"]
    x, y = digits.batch(1, seed=8)
    rec = fedleak.reconstruct(model, _gradient(model, x, y), attack="first-layer", num_examples=1)
    assert rec.num_certified == 1 and float((rec.inputs.reshape(1, -1) - x.reshape(1, -1)).abs().max()) < 1e-5
    x, y = digits.batch(6, seed=9)
    update = fedleak.fedavg_update(model, x, y, lr=0.05, local_steps=3, optimizer="momentum")
    rec = fedleak.reconstruct(model, update, attack="first-layer")
    score = fedleak.metrics.match(rec, x, y, data_range=digits.value_range)
    assert score.false_certificates == 0 and int(score.exact.sum()) >= 3


def test_a_model_the_exact_methods_do_not_read_is_peeled_for_the_first_layer_attack(digits):
    """A GELU MLP that normalises inside forward: the exact route refuses its GELU, the first-layer attack reads the
    one sample through the normalisation."""
    torch.manual_seed(6)

    class Gelu(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(64, 32)
            self.fc2 = nn.Linear(32, 10)

        def forward(self, x):
            return self.fc2(F.gelu(self.fc1(((x - 0.5) / 0.25).flatten(1))))

    model = Gelu().eval()
    x, y = digits.batch(1, seed=10)
    grads = _gradient(model, x, y)
    with pytest.raises(ModelError, match="gelu"):
        fedleak.reconstruct(model, grads)
    rec = fedleak.reconstruct(model, grads, attack="first-layer", num_examples=1)
    assert rec.num_certified == 1 and float((rec.inputs.reshape(1, -1) - x.reshape(1, -1)).abs().max()) < 1e-5


class PlainNumbers(nn.Module):
    """A normalisation by Python numbers held as attributes (``self.mean = 0.286``), which tracing bakes in."""

    def __init__(self) -> None:
        super().__init__()
        self.mean, self.std = 0.286, 0.353
        self.fc1 = nn.Linear(64, 256)
        self.fc2 = nn.Linear(256, 10)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(((x - self.mean) / self.std).flatten(1))))


def test_a_changed_number_attribute_is_read_anew(digits):
    """The same model object with its mean and std changed between two attacks: the second map is the new one (a
    map read once and kept gave 8 false certificates of 8: the first layer's inputs mapped back by the old map)."""
    torch.manual_seed(0)
    model = PlainNumbers().eval()
    x, y = digits.batch(6, seed=3)
    for mean, std in ((0.286, 0.353), (0.5, 0.25)):
        model.mean, model.std = mean, std
        rec = fedleak.reconstruct(model, sized_gradient(model, x, y))
        score = fedleak.metrics.match(rec, x, y, data_range=digits.value_range)
        assert rec.num_certified >= 4 and score.false_certificates == 0 and int(score.exact.sum()) >= rec.num_certified
        assert any(f"z = {1 / std:.6g} x" in n for n in rec.notes)
