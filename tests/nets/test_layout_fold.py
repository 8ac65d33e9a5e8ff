"""A change of layout just before a Linear layer (maps flattened channels-last, as models ported from Keras write it;
a Conv1d's signals flattened time-major) folded into that layer (fedleak.nets.layout_fold): the exact methods read the
model as its twin whose layer reads the maps as they are, with its columns reordered, and certify what that twin
certifies."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from user_models import sized_gradient

import fedleak
from fedleak.defenses.exclusivity_reduction import reduce_exclusivity
from fedleak.errors import ModelError

CHANGES = {
    "permute": lambda a: a.permute(0, 2, 3, 1).reshape(a.shape[0], -1),
    "movedim": lambda a: torch.flatten(torch.movedim(a, 1, -1), 1),
    "transpose, view": lambda a: a.transpose(1, 3).contiguous().view(a.size(0), -1),
    "reshape, transpose": lambda a: a.reshape(a.shape[0], 6, 64).transpose(1, 2).flatten(1),
}


class ChannelsLast(nn.Module):
    """A user's CNN on 8 x 8 digits that flattens its maps with ``change`` (none: channel-major, the twin)."""

    def __init__(self, change: str | None = "permute") -> None:
        super().__init__()
        self.change = change
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.drop = nn.Dropout(0.25)
        self.fc = nn.Linear(6 * 8 * 8, 256)
        self.out = nn.Linear(256, 10)

    def forward(self, x):
        a = F.relu(self.conv(x))
        flat = a.flatten(1) if self.change is None else CHANGES[self.change](a)
        return self.out(F.relu(self.fc(self.drop(flat))))


def twins(change: str, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """The model and its twin: the same weights, the twin's ``fc`` columns in the maps' own order."""
    torch.manual_seed(seed)
    model = ChannelsLast(change).eval()
    twin = ChannelsLast(None).eval()
    twin.load_state_dict(model.state_dict())
    order = CHANGES[change](torch.arange(6 * 64).reshape(1, 6, 8, 8)).reshape(-1)
    with torch.no_grad():
        twin.fc.weight[:, order] = model.fc.weight
    return model, twin


def digit_maps(data: fedleak.Dataset, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = data.batch(n, seed=seed)
    return x.reshape(n, 1, 8, 8), y


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_maps_flattened_channels_last_certify_what_the_twin_certifies(digits, change):
    model, twin = twins(change)
    x, y = digit_maps(digits, 8, seed=1)
    assert torch.allclose(model(x), twin(x), atol=1e-5)
    rec = fedleak.reconstruct(model, sized_gradient(model, x, y), attack="exclusivity")
    read = fedleak.reconstruct(twin, sized_gradient(twin, x, y), attack="exclusivity")
    score = fedleak.metrics.match(rec, x, y)
    assert rec.num_certified >= 4 and score.false_certificates == 0 and int(score.exact.sum()) >= rec.num_certified
    assert rec.certified.tolist() == read.certified.tolist()
    assert torch.allclose(rec.inputs[rec.certified], read.inputs[read.certified], atol=1e-5)
    assert any("change of layout" in n and "before Linear 'fc'" in n for n in rec.notes)


def test_a_hidden_layers_units_reordered_are_read_too(digits):
    """A transpose between two Linear layers of an MLP (units viewed as a grid): the later layer's columns move."""

    class Grid(nn.Module):
        def __init__(self, transposed: bool = True) -> None:
            super().__init__()
            self.transposed = transposed
            self.fc1, self.fc2, self.fc3 = nn.Linear(64, 512), nn.Linear(512, 256), nn.Linear(256, 10)

        def forward(self, x):
            h = F.relu(self.fc1(x.flatten(1)))
            h = h.view(-1, 16, 32).transpose(1, 2).reshape(h.shape[0], -1) if self.transposed else h
            return self.fc3(F.relu(self.fc2(h)))

    torch.manual_seed(3)
    model, twin = Grid().eval(), Grid(False).eval()
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        twin.fc2.weight[:, torch.arange(512).view(1, 16, 32).transpose(1, 2).reshape(-1)] = model.fc2.weight
    x, y = digits.batch(8, seed=2)
    rec = fedleak.reconstruct(model, sized_gradient(model, x, y), attack="exclusivity")
    read = fedleak.reconstruct(twin, sized_gradient(twin, x, y), attack="exclusivity")
    assert rec.num_certified >= 4 and rec.certified.tolist() == read.certified.tolist()
    assert fedleak.metrics.match(rec, x, y).false_certificates == 0


def test_a_one_step_change_is_read_with_its_columns_reordered(digits):
    model, twin = twins("permute", seed=1)
    x, y = digit_maps(digits, 4, seed=3)

    def step(m: nn.Module) -> dict[str, torch.Tensor]:
        after = copy.deepcopy(m)
        F.cross_entropy(after(x), y).backward()
        torch.optim.SGD(after.parameters(), lr=0.1).step()
        return after.state_dict()

    rec = fedleak.reconstruct(model, step(model), num_examples=4, learning_rate=0.1, attack="exclusivity")
    read = fedleak.reconstruct(twin, step(twin), num_examples=4, learning_rate=0.1, attack="exclusivity")
    assert rec.num_certified >= 1 and rec.certified.tolist() == read.certified.tolist()
    assert fedleak.metrics.match(rec, x, y).false_certificates == 0


def test_fishing_and_exclusivity_reduction_work_through_the_fold(digits):
    model, twin = twins("permute", seed=2)
    x, y = digit_maps(digits, 16, seed=4)
    fished, read = fedleak.fish(model, x, y), fedleak.fish(twin, x, y)
    assert fished.certifiable_after.all() and torch.allclose(fished.inputs, read.inputs, atol=1e-5)
    rec = fedleak.reconstruct(model, sized_gradient(model, fished.inputs, y), attack="exclusivity")
    assert rec.num_certified == 16 and fedleak.metrics.match(rec, fished.inputs, y).false_certificates == 0
    reduced = reduce_exclusivity(model, x, y)
    assert torch.allclose(reduced.inputs, reduce_exclusivity(twin, x, y).inputs, atol=1e-5)


def test_the_plan_reads_the_model_and_says_how(digits):
    model, _ = twins("movedim")
    x, y = digit_maps(digits, 8, seed=5)
    plan = fedleak.plan(model, sized_gradient(model, x, y), x)
    assert any("change of layout 'movedim'" in n for n in plan.notes)


def test_changes_of_layout_it_does_not_fold_are_refused_by_name():
    class Functional(ChannelsLast):  # the Linear layer is F.linear of parameters: not folded
        def forward(self, x):
            a = F.relu(self.conv(x)).permute(0, 2, 3, 1).flatten(1)
            return self.out(F.relu(F.linear(a, self.fc.weight, self.fc.bias)))

    class IntoConv(ChannelsLast):  # a transpose of the maps that a conv reads next
        def forward(self, x):
            a = F.relu(self.conv(F.relu(self.conv2(x)).transpose(2, 3)))
            return self.out(F.relu(self.fc(a.flatten(1))))

        def __init__(self) -> None:
            super().__init__()
            self.conv2 = nn.Conv2d(1, 1, 3, padding=1)

    for model in (Functional(), IntoConv()):
        with pytest.raises(ModelError, match="a change of layout"):
            fedleak.reconstruct(model.eval(), {}, attack="exclusivity", input_shape=(1, 8, 8))


def test_a_weight_normalised_layer_after_a_change_of_layout_is_refused_by_name():
    model = ChannelsLast("permute").eval()
    torch.nn.utils.parametrizations.weight_norm(model.fc)
    with pytest.raises(ModelError, match="'fc' has weight normalisation and .* a change of layout"):
        fedleak.reconstruct(model, {}, attack="exclusivity", input_shape=(1, 8, 8))
