"""A change of layout of the model's input before its first layer (time series stored N x T x C, permuted in
``forward`` for a ``Conv1d`` that reads N x C x T): read as a reordering of each input's values
(fedleak.nets.input_peel), so the exact methods certify what they certify of the same model without it, on data
stored as its first layer reads it, and give the inputs back in the data's own layout."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fedleak
from fedleak.defenses.exclusivity_reduction import reduce_exclusivity
from fedleak.errors import ModelError

T, C, CLASSES = 32, 3, 4


def signals(n: int, length: int = T, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` signals of ``C`` channels stored N x T x C (a sine per channel at the class's frequency, a random phase,
    noise), in [0, 1], and their classes."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=gen)
    t = torch.linspace(0, 1, length)
    freq = (y[:, None, None] + 1 + torch.arange(C)[None, :, None]).float()
    phase = 6 * torch.rand(n, C, 1, generator=gen)
    x = 0.5 + 0.4 * torch.sin(2 * math.pi * freq * t + phase) + 0.05 * torch.randn(n, C, length, generator=gen)
    return x.clamp(0, 1).permute(0, 2, 1).contiguous(), y


class Activity(nn.Module):
    """A user's 1-D CNN on N x T x C data: ``x.permute(0, 2, 1)`` (or ``x.transpose(1, 2)``) first, unless
    ``stored_as_read`` (the twin, given N x C x T data)."""

    def __init__(self, how: str = "permute", length: int = T) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv1d(C, 16, 5, padding=2)
        self.fc = nn.Linear(16 * length, 512)
        self.out = nn.Linear(512, CLASSES)

    def forward(self, x):
        if self.how == "permute":
            x = x.permute(0, 2, 1)
        elif self.how == "transpose":
            x = torch.transpose(x, 1, 2)
        return self.out(F.relu(self.fc(F.relu(self.conv(x)).flatten(1))))


def _twins(how: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = Activity(how)
    twin = Activity("stored_as_read")
    twin.load_state_dict(model.state_dict())
    return model, twin


@pytest.mark.parametrize("how", ["permute", "transpose"])
def test_a_permuted_input_certifies_what_the_model_without_it_certifies(how):
    model, twin = _twins(how)
    x, y = signals(4)
    rec = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x, y), attack="exclusivity")
    read = fedleak.reconstruct(twin, fedleak.compute_gradient_update(twin, x.transpose(1, 2), y),
                               attack="exclusivity")
    assert rec.num_certified == read.num_certified == 4
    assert rec.inputs.shape == (4, T, C)  # the data's own layout, the shape found from the model
    assert torch.equal(rec.inputs.transpose(1, 2), read.inputs.reshape(4, C, T))
    assert fedleak.metrics.match(rec, x, y).false_certificates == 0
    assert any("reordered from (32, 3) to (3, 32)" in n for n in rec.notes)
    assert fedleak.analyze_exclusivity(model, x, y).certifiable.tolist() == \
        fedleak.analyze_exclusivity(twin, x.transpose(1, 2), y).certifiable.tolist()


def test_the_plan_measures_the_data_as_stored_and_names_the_models_input_shape():
    model, twin = _twins("permute")
    x, y = signals(64, seed=6)
    plan = fedleak.plan(model, None, (x, y), batch_sizes=[4, 16])
    read = fedleak.plan(twin, None, (x.transpose(1, 2), y), batch_sizes=[4, 16])
    assert plan.input_shape == (T, C) and read.input_shape == (C, T)
    assert plan.dense == read.dense and plan.blocks == read.blocks  # (measured on the values as the layers read them)


def test_a_permuted_input_is_read_from_a_one_step_weight_change_and_by_auto():
    model, twin = _twins("permute")
    x, y = signals(4, seed=1)
    for lr in (0.1, 1.0):  # (at 0.1 the step's rounding is read into the features' proven error)
        change = fedleak.fedavg_update(model, x, y, lr=lr, local_steps=1, reveal_learning_rate=True)
        rec = fedleak.reconstruct(model, change, attack="exclusivity")
        read = fedleak.reconstruct(twin, fedleak.fedavg_update(twin, x.transpose(1, 2), y, lr=lr, local_steps=1,
                                                               reveal_learning_rate=True), attack="exclusivity")
        assert rec.num_certified == read.num_certified == 4
        assert fedleak.metrics.match(rec, x, y).false_certificates == 0
    auto = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x, y), attack="auto", budget=5,
                               progress=False)
    assert auto.num_certified == 4 and fedleak.metrics.match(auto, x, y).recovered_fraction == 1.0


class Scaled(nn.Module):
    """An MLP whose forward transposes its N x T x C input and normalises it, then flattens it."""

    def __init__(self, transposed: bool = True) -> None:
        super().__init__()
        self.transposed = transposed
        self.fc = nn.Linear(T * C, 512)
        self.out = nn.Linear(512, CLASSES)

    def forward(self, x):
        if self.transposed:
            x = x.transpose(1, 2)
        x = (x - 0.5) / 0.25
        return self.out(F.relu(self.fc(x.reshape(x.size(0), -1))))


def test_a_transpose_among_the_inputs_arithmetic_is_one_map_and_needs_the_shape_it_cannot_find():
    torch.manual_seed(1)
    model = Scaled()
    twin = Scaled(transposed=False)
    twin.load_state_dict(model.state_dict())
    x, y = signals(2, seed=2)
    update = fedleak.compute_gradient_update(model, x, y)
    # the first layer reads T * C values: no input shape follows from it
    with pytest.raises(ModelError, match=r"changes its input's layout .* pass input_shape="):
        fedleak.reconstruct(model, update, attack="exclusivity")
    rec = fedleak.reconstruct(model, update, attack="exclusivity", input_shape=(T, C))
    read = fedleak.reconstruct(twin, fedleak.compute_gradient_update(twin, x.transpose(1, 2), y),
                               attack="exclusivity", input_shape=(C, T))
    assert rec.certified.tolist() == read.certified.tolist() and rec.num_certified >= 1
    assert torch.allclose(rec.inputs[rec.certified].transpose(1, 2), read.inputs[read.certified], atol=1e-6)
    assert fedleak.metrics.match(rec, x, y).false_certificates == 0
    one = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x[:1], y[:1]), attack="first-layer",
                              input_shape=(T, C))
    assert one.num_certified == 1 and float((one.inputs[0] - x[0]).abs().max()) < 1e-5


def test_what_is_not_a_reordering_of_each_input_is_refused():
    class BatchMoved(Activity):
        def forward(self, x):
            return super().forward(x.transpose(0, 1))

    x, y = signals(2)
    with pytest.raises(ModelError, match="batch's dimension"):
        fedleak.reconstruct(BatchMoved("stored_as_read"), {}, attack="exclusivity", input_shape=(T, C))


@pytest.mark.parametrize("kind", ["conv", "mlp"])
def test_fishing_and_exclusivity_reduction_work_through_a_change_of_layout(kind):
    """The LPs are written over the data as stored (each first-layer column moved to the value it reads): the
    fished and the reduced batches are the twin's, in the data's own layout."""
    if kind == "conv":
        model, twin = _twins("permute")
    else:
        torch.manual_seed(1)
        model, twin = Scaled(), Scaled(transposed=False)
        twin.load_state_dict(model.state_dict())
    x, y = signals(8, seed=4)
    fished, read = fedleak.fish(model, x, y), fedleak.fish(twin, x.transpose(1, 2), y)
    assert fished.certifiable_after.all() and fished.certifiable_after.tolist() == read.certifiable_after.tolist()
    assert torch.allclose(fished.inputs.transpose(1, 2), read.inputs, atol=1e-6)
    assert float(fished.inputs.min()) >= 0 and float(fished.inputs.max()) <= 1
    rec = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, fished.inputs, y), attack="exclusivity",
                              input_shape=(T, C))
    assert rec.num_certified == 8 and fedleak.metrics.match(rec, fished.inputs, y).false_certificates == 0
    reduced, twin_reduced = reduce_exclusivity(model, x, y), reduce_exclusivity(twin, x.transpose(1, 2), y)
    assert torch.allclose(reduced.inputs.transpose(1, 2), twin_reduced.inputs, atol=1e-6)
    assert not fedleak.analyze_exclusivity(model, reduced.inputs, y).certifiable.any()
