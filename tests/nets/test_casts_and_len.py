"""Casts and ``len(x)`` in a user's forward: what fedleak's exact methods read as the identity or a shape query."""

from __future__ import annotations

import builtins

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fedleak
from fedleak.errors import ModelError
from fedleak.nets.input_map import peel_input_map


class Written(nn.Module):
    """An MLP on 8 x 8 images whose forward first runs ``prefix`` (a function of x) then flattens with ``flat``."""

    def __init__(self, prefix, flat=lambda x: x.view(x.size(0), -1)) -> None:
        super().__init__()
        self.prefix, self.flat = prefix, flat
        self.fc1 = nn.Linear(64, 256)
        self.fc2 = nn.Linear(256, 10)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(self.flat(self.prefix(x)))))


KEPT = {
    "x.float()": lambda x: x.float(),
    "x.to(torch.float32)": lambda x: x.to(torch.float32),
    "x.to('cpu')": lambda x: x.to("cpu"),
    "x.type(torch.float32)": lambda x: x.type(torch.float32),
    "x.contiguous().float()": lambda x: x.contiguous().float(),
}


def _gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    return {n: g for (n, _), g in zip(model.named_parameters(), grads)}


def _certified_exact(model: nn.Module, digits: fedleak.Dataset, seed: int = 3) -> fedleak.Reconstruction:
    x, y = digits.batch(6, seed=seed)
    rec = fedleak.reconstruct(model, _gradient(model, x, y))
    result = fedleak.metrics.match(rec, x, y, data_range=digits.value_range)
    assert rec.num_certified >= 4 and result.false_certificates == 0
    assert int(result.exact.sum()) >= rec.num_certified
    return rec


@pytest.mark.parametrize("name", list(KEPT))
def test_a_cast_that_keeps_the_model_s_dtype_is_read_as_the_identity(digits, name):
    torch.manual_seed(0)
    model = Written(KEPT[name]).eval()
    kinds = [type(st.layer) for st in fedleak.as_network(model).steps]
    assert kinds == [type(st.layer) for st in fedleak.as_network(Written(lambda x: x)).steps]
    _certified_exact(model, digits)


def test_a_cast_inside_a_normalisation_is_read_through(digits):
    """``x.float() / 255``-style forwards: the cast sits among the arithmetic, which is read as the map it is."""
    torch.manual_seed(0)
    model = Written(lambda x: ((x.float() - 0.5) / 0.25).to(torch.float32)).eval()
    rec = _certified_exact(model, digits)
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
        fedleak.as_network(Written(prefix))


def test_a_float64_model_reads_a_cast_to_float64_as_the_identity(digits):
    torch.manual_seed(0)
    model = Written(lambda x: x.double()).double().eval()
    fedleak.as_network(model)
    with pytest.raises(ModelError, match="from torch.float64 to torch.float32"):
        fedleak.as_network(Written(lambda x: x.float().double()).double())


@pytest.mark.parametrize("flat", [lambda x: x.view(len(x), -1), lambda x: x.reshape(len(x), 64)])
def test_len_of_the_input_is_read_as_its_batch_size(digits, flat):
    torch.manual_seed(0)
    _certified_exact(Written(lambda x: x, flat).eval(), digits)
    assert builtins.len is len and len([1, 2]) == 2  # the builtin again after tracing


def test_len_is_the_builtin_again_after_a_trace_that_fails():
    class Branching(Written):
        def forward(self, x):
            if len(x) > 1:  # data-dependent control flow: not traceable
                x = x * 1
            return super().forward(x)

    with pytest.raises(ModelError, match="could not trace"):
        fedleak.as_network(Branching(lambda x: x))
    assert builtins.len([1, 2, 3]) == 3 and "Proxy" not in repr(builtins.len)
