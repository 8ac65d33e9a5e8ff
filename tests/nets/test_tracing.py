"""Tracing a user's forward as written: ``len(x)``, inputs with defaults, plain Sequentials built directly."""

from __future__ import annotations

import builtins

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fedleak
from fedleak.errors import ModelError
from fedleak.nets.tracing import trace_model
from tests.user_models import PrefixedMLP, certified_exactly


@pytest.mark.parametrize("flat", [lambda x: x.view(len(x), -1), lambda x: x.reshape(len(x), 64)])
def test_len_of_the_input_is_read_as_its_batch_size(digits, flat):
    torch.manual_seed(0)
    certified_exactly(PrefixedMLP(lambda x: x, flat).eval(), digits)
    assert builtins.len is len and len([1, 2]) == 2  # the builtin again after tracing


def test_len_is_the_builtin_again_after_a_trace_that_fails():
    class Branching(PrefixedMLP):
        def forward(self, x):
            if len(x) > 1:  # data-dependent control flow: not traceable
                x = x * 1
            return super().forward(x)

    with pytest.raises(ModelError, match="could not trace"):
        fedleak.as_network(Branching(lambda x: x))
    assert builtins.len([1, 2, 3]) == 3 and "Proxy" not in repr(builtins.len)


class OptionalInputs(nn.Module):
    """``forward(self, x, labels=None, *, temperature=1.0)``: the loss when labels are given, else the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 256)
        self.fc2 = nn.Linear(256, 10)

    def forward(self, x, labels=None, *, temperature: float = 1.0):
        logits = self.fc2(F.relu(self.fc1(x.flatten(1))))
        if labels is not None:
            return F.cross_entropy(logits, labels)
        return logits if temperature == 1.0 else logits / temperature


def test_inputs_with_defaults_are_traced_at_them(digits):
    """The graph takes the batch alone and computes what a call with the batch alone computes."""
    torch.manual_seed(0)
    model = OptionalInputs().eval()
    gm = trace_model(model)
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["x"]
    x, _ = digits.batch(3, seed=0)
    assert torch.equal(gm(x), model(x))
    certified_exactly(model, digits)


def test_an_input_without_a_default_is_refused_by_count():
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x, mask):
            return self.fc(x.flatten(1) * mask)

    with pytest.raises(ModelError, match=r"takes 2 inputs \(x, mask\).*give the others defaults"):
        fedleak.as_network(TwoInputs())


def test_len_is_read_again_in_a_model_whose_input_arithmetic_was_peeled(digits):
    """The peeled model is a graph module traced again: its len node must record itself again."""
    torch.manual_seed(0)
    rec = certified_exactly(PrefixedMLP(lambda x: (x - 0.5) / 0.25, lambda x: x.view(len(x), -1)).eval(), digits)
    assert any("maps its input before its first layer" in n for n in rec.notes)


def test_what_is_kept_per_structure_goes_with_the_model_and_its_structure():
    import gc
    import weakref

    from fedleak.nets.tracing import PerStructure, shared_trace

    kept: PerStructure[int] = PerStructure()
    calls = []
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    assert kept.get(model, "k", lambda: calls.append(1) or len(calls)) == 1
    assert kept.get(model, "k", lambda: calls.append(1) or len(calls)) == 1 and model in kept  # kept
    model.eval()  # a mode is part of the structure: computed again
    assert kept.get(model, "k", lambda: calls.append(1) or len(calls)) == 2
    assert shared_trace(model) is shared_trace(model)  # one trace per structure
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None  # nothing kept holds the model


def test_tracing_leaves_a_forward_s_buffers_as_they_were():
    """A forward that counts its calls in a buffer updates the real buffer while torch.fx traces it; tracing puts it
    back, and leaves a buffer it did not change untouched (its version too, by which readers tell a changed model)."""

    class Counting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.register_buffer("passes", torch.zeros(()))
            self.register_buffer("still", torch.ones(3))

        def forward(self, x):
            self.passes += 1
            return self.fc(x) * self.still

    model = Counting()
    version = model.still._version
    trace_model(model)
    assert float(model.passes) == 0.0 and model.still._version == version
