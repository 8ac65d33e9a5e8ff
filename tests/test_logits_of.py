"""Models whose forward returns more than the logits: refused with the way out, and read through LogitsOf."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fedleak
from fedleak.errors import ModelError, OptionError
from fedleak.logits_of import NotLogits
from fedleak.models.zoo import load_model_for


class WithFeatures(nn.Module):
    """``return logits, features`` (or a dict of them), with a buffer, a plain attribute, a helper method and a
    property the forward reads, as users' classes do."""

    def __init__(self, as_dict: bool = False) -> None:
        super().__init__()
        self.as_dict = as_dict
        self.register_buffer("mean", torch.tensor(0.25))
        self.fc1 = nn.Linear(64, 256)
        self.fc2 = nn.Linear(256, 10)

    @property
    def spread(self) -> float:
        return 0.5

    def features(self, x):
        return F.relu(self.fc1(((x - self.mean) / self.spread).flatten(1)))

    def forward(self, x):
        f = self.features(x)
        logits = self.fc2(f)
        return {"logits": logits, "features": f} if self.as_dict else (logits, f)


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out["logits"] if isinstance(out, dict) else out[0]


def _gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    grads = torch.autograd.grad(F.cross_entropy(_logits(model, x), y), list(model.parameters()))
    return {n: g for (n, _), g in zip(model.named_parameters(), grads)}


@pytest.mark.parametrize("attack", ["exclusivity", "first-layer", "auto", "ig"])
def test_every_attack_refuses_a_tuple_output_saying_what_to_pass(digits, attack):
    model = WithFeatures().eval()
    x, y = digits.batch(4, seed=1)
    with pytest.raises(NotLogits, match=r"returns a tuple of 2 \(tensor, tensor\).*fedleak\.LogitsOf\(model, 0\)"):
        fedleak.reconstruct(model, _gradient(model, x, y), attack=attack)


def test_the_other_entries_refuse_it_alike(digits):
    x, y = digits.batch(4, seed=1)
    model = WithFeatures(as_dict=True).eval()
    with pytest.raises(NotLogits, match=r"a dict with keys \['features', 'logits'\].*LogitsOf\(model, 'logits'\)"):
        fedleak.analyze_exclusivity(model, x, y)
    with pytest.raises(NotLogits):
        fedleak.compute_gradient_update(model, x, y)
    with pytest.raises(NotLogits):  # also with the input shape given (no probe for it)
        fedleak.reconstruct(model, _gradient(model, x, y), attack="first-layer", input_shape=(1, 8, 8))


@pytest.mark.parametrize("as_dict", [False, True])
def test_logits_of_is_the_model_under_its_own_names(digits, as_dict):
    torch.manual_seed(0)
    model = WithFeatures(as_dict).eval()
    wrapped = fedleak.LogitsOf(model, "logits" if as_dict else 0)
    assert [n for n, _ in wrapped.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert list(wrapped.state_dict()) == list(model.state_dict())
    assert all(a is b for a, b in zip(wrapped.parameters(), model.parameters()))
    x, y = digits.batch(6, seed=2)
    assert torch.equal(wrapped(x), _logits(model, x))
    rec = fedleak.reconstruct(wrapped, _gradient(model, x, y), num_examples=6)  # the update as the client keys it
    result = fedleak.metrics.match(rec, x, y, data_range=digits.value_range)
    assert rec.num_certified >= 4 and result.false_certificates == 0 and int(result.exact.sum()) >= rec.num_certified
    assert int(fedleak.analyze_exclusivity(wrapped, x, y).certifiable.sum()) >= 4


def test_a_fedavg_reply_and_the_optimisation_attacks_read_through_it(digits):
    torch.manual_seed(1)
    model = WithFeatures().eval()
    wrapped = fedleak.LogitsOf(model, 0)
    x, y = digits.batch(4, seed=4)
    trained = copy.deepcopy(model)
    opt = torch.optim.SGD(trained.parameters(), lr=0.1)
    F.cross_entropy(_logits(trained, x), y).backward()
    opt.step()
    rec = fedleak.reconstruct(wrapped, trained.state_dict(), num_examples=4)
    assert rec.num_certified >= 2
    assert fedleak.metrics.match(rec, x, y, data_range=digits.value_range).false_certificates == 0
    one = fedleak.GradientUpdate(_gradient(model, x[:1], y[:1]), num_examples=1)
    ig = fedleak.reconstruct(wrapped, one, attack="ig", iterations=30, input_shape=(1, 8, 8), seed=0)
    assert ig.inputs.shape == (1, 1, 8, 8) and torch.isfinite(ig.inputs).all()


def test_logits_of_follows_the_model_s_mode_and_copies_as_one_model():
    model = WithFeatures()
    wrapped = fedleak.LogitsOf(model, 0).eval()
    assert not wrapped.training and not model.fc1.training
    copied = copy.deepcopy(wrapped)
    assert copied.fc1 is copied.wrapped.fc1 and copied.fc1 is not model.fc1
    assert copied.spread == 0.5 and copied.as_dict is False


def test_bad_positions_and_models_are_refused(digits):
    with pytest.raises(OptionError, match="position"):
        fedleak.LogitsOf(WithFeatures(), 1.5)
    with pytest.raises(ModelError, match="must be a torch.nn.Module"):
        fedleak.LogitsOf(object(), 0)
    with pytest.raises(ModelError, match="has no 'scores'"):
        fedleak.LogitsOf(WithFeatures(as_dict=True), "scores")(digits.batch(2, seed=0)[0])


def test_a_user_file_whose_class_returns_a_tuple_is_refused_with_the_way_out(tmp_path):
    (tmp_path / "net.py").write_text(
        "import torch.nn as nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.fc = nn.Linear(64, 10)\n"
        "    def forward(self, x):\n"
        "        return self.fc(x.flatten(1)), x\n"
        "def wrapped():\n"
        "    import fedleak\n"
        "    return fedleak.LogitsOf(Net(), 0)\n")
    with pytest.raises(NotLogits, match="a function NAME in the file that returns it"):
        load_model_for(f"{tmp_path / 'net.py'}:Net", (1, 8, 8), 10)
    assert isinstance(load_model_for(f"{tmp_path / 'net.py'}:wrapped", (1, 8, 8), 10), fedleak.LogitsOf)


def test_an_output_object_is_read_by_attribute(digits):
    from dataclasses import dataclass

    @dataclass
    class Output:
        logits: torch.Tensor
        hidden: torch.Tensor

    class ObjectOut(WithFeatures):
        def forward(self, x):
            f = self.features(x)
            return Output(self.fc2(f), f)

    torch.manual_seed(0)
    model = ObjectOut().eval()
    with pytest.raises(NotLogits, match=r"returns a Output.*LogitsOf\(model, 'logits'\)"):
        fedleak.as_network(model)
    wrapped = fedleak.LogitsOf(model, "logits")
    x, y = digits.batch(6, seed=2)
    grads = torch.autograd.grad(F.cross_entropy(model(x).logits, y), list(model.parameters()))
    rec = fedleak.reconstruct(wrapped, list(grads), num_examples=6)
    assert rec.num_certified >= 4
    assert fedleak.metrics.match(rec, x, y, data_range=digits.value_range).false_certificates == 0


def test_per_sample_logits_reads_a_squeezed_logit_as_a_column():
    from fedleak.logits_of import per_sample_logits

    assert per_sample_logits(torch.arange(3.0), 3).shape == (3, 1)
    assert per_sample_logits(torch.zeros(3, 4), 3).shape == (3, 4)
    assert per_sample_logits(torch.zeros(4), 1).shape == (4,)  # not one value per sample: left for the caller
