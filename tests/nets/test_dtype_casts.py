"""Casts in a user's forward: the identity where the values keep the model's dtype, refused where they round."""

from __future__ import annotations

import pytest
import torch

import fedleak
from fedleak.errors import ModelError
from fedleak.nets.input_peel import peel_input_map
from tests.user_models import PrefixedMLP, certified_exactly

KEPT = {
    "x.float()": lambda x: x.float(),
    "x.to(torch.float32)": lambda x: x.to(torch.float32),
    "x.to('cpu')": lambda x: x.to("cpu"),
    "x.type(torch.float32)": lambda x: x.type(torch.float32),
    "x.contiguous().float()": lambda x: x.contiguous().float(),
    "x.clone()": lambda x: x.clone(),
    "torch.clone(x)": torch.clone,
}


@pytest.mark.parametrize("name", list(KEPT))
def test_a_cast_that_keeps_the_model_s_dtype_is_read_as_the_identity(digits, name):
    torch.manual_seed(0)
    model = PrefixedMLP(KEPT[name]).eval()
    kinds = [type(st.layer) for st in fedleak.as_network(model).steps]
    assert kinds == [type(st.layer) for st in fedleak.as_network(PrefixedMLP(lambda x: x)).steps]
    certified_exactly(model, digits)


def test_a_clone_inside_a_normalisation_and_of_a_hidden_layer_is_the_identity(digits):
    """``x = x.clone()`` before an in-place normalisation, and a hidden layer's output cloned."""
    torch.manual_seed(0)
    model = PrefixedMLP(lambda x: (x.clone() - 0.5).clone() / 0.25).eval()
    rec = certified_exactly(model, digits)
    assert any("maps its input before its first layer" in n for n in rec.notes)
    hidden = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 256), torch.nn.ReLU(), Cloned(),
                                 torch.nn.Linear(256, 10)).eval()
    certified_exactly(hidden, digits)


class Cloned(torch.nn.Module):
    def forward(self, x):
        return x.clone()


def test_a_cast_inside_a_normalisation_is_read_through(digits):
    """``x.float() / 255``-style forwards: the cast sits among the arithmetic, which is read as the map it is."""
    torch.manual_seed(0)
    model = PrefixedMLP(lambda x: ((x.float() - 0.5) / 0.25).to(torch.float32)).eval()
    rec = certified_exactly(model, digits)
    assert any("maps its input before its first layer" in n for n in rec.notes)
    x, _ = digits.batch(6, seed=3)
    _, input_map = peel_input_map(model, inputs=x)
    assert torch.allclose(input_map.scale, torch.full_like(input_map.scale, 4.0), rtol=0, atol=1e-12)


@pytest.mark.parametrize("prefix, needle", [
    (lambda x: x.half().float(), "from torch.float32 to torch.float16"),
    (lambda x: x.to(torch.bfloat16).float(), "from torch.float32 to torch.bfloat16"),
    (lambda x: x.double().float(), "from torch.float32 to torch.float64"),
])
def test_a_cast_to_another_dtype_is_refused_saying_it_rounds(prefix, needle):
    with pytest.raises(ModelError, match=needle.replace(".", r"\.")):
        fedleak.as_network(PrefixedMLP(prefix))


def test_a_float64_model_reads_a_cast_to_float64_as_the_identity(digits):
    torch.manual_seed(0)
    model = PrefixedMLP(lambda x: x.double()).double().eval()
    fedleak.as_network(model)
    with pytest.raises(ModelError, match="from torch.float64 to torch.float32"):
        fedleak.as_network(PrefixedMLP(lambda x: x.float().double()).double())
