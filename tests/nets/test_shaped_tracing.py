"""A forward that computes with its input's shape in Python, traced for inputs of one shape."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fedleak
from fedleak.errors import ModelError
from fedleak.nets.shaped_tracing import shaped_trace
from fedleak.nets.tracing import trace_model, traced_shape
from tests.user_models import PrefixedMLP, certified_exactly, sized_gradient


def num_flat_features(x: torch.Tensor) -> int:
    """PyTorch's older LeNet tutorial: the product of every dimension but the batch's, by a loop."""
    features = 1
    for s in x.size()[1:]:
        features *= s
    return features


# what torch.fx alone refuses to trace
FLATTENS = {
    "num_flat_features": lambda x: x.view(-1, num_flat_features(x)),
    "np.prod": lambda x: x.reshape(-1, int(np.prod(x.shape[1:]))),
    "math.prod, batch size": lambda x: x.reshape(x.shape[0], math.prod(s for s in x.shape[1:])),
    "branch on dim": lambda x: x.flatten(1) if x.dim() > 2 else x,
    "branch on ndim and shape": lambda x: x.view(len(x), -1) if x.ndim == 4 and x.shape[1:] == (1, 8, 8) else x,
    "branch on len(x.shape)": lambda x: x.reshape(x.size(0), -1) if len(x.shape) == 4 else x,
    "branch on ndimension()": lambda x: torch.flatten(x, 1) if x.ndimension() > 2 else x,
}


@pytest.mark.parametrize("flat", list(FLATTENS.values()), ids=list(FLATTENS))
def test_a_forward_that_computes_with_its_inputs_shape_is_certified(digits, flat):
    torch.manual_seed(0)
    model = PrefixedMLP(lambda x: x, flat).eval()
    rec = certified_exactly(model, digits)
    assert rec.num_certified >= 4
    net = fedleak.as_network(model, input_shape=(1, 8, 8))
    assert any("read for inputs of shape (1, 8, 8), any batch size" in n for n in net.notes)


def test_the_graph_takes_any_batch_size_and_computes_the_model():
    torch.manual_seed(0)
    model = PrefixedMLP(lambda x: x, FLATTENS["num_flat_features"]).eval()
    gm = trace_model(model, (1, 8, 8))
    assert traced_shape(gm) == (1, 8, 8)
    for n in (1, 2, 5):
        x = torch.rand(n, 1, 8, 8)
        assert torch.equal(gm(x), model(x))
    # the loop's product is a number in the graph; the batch size is never one
    assert not any(n.op == "call_method" and n.target == "size" for n in gm.graph.nodes)


def test_a_plain_forward_is_traced_as_before():
    model = PrefixedMLP(lambda x: x).eval()
    assert traced_shape(trace_model(model)) is None


class BlitzLeNet(nn.Module):
    """PyTorch's older 60-minute-blitz LeNet's forward (``num_flat_features``), on a conv layer that 8 x 8 digits can
    be certified through (one conv, a wide head, no max pooling), and a branch for an unbatched image."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 8 * 8, 1024)
        self.fc2 = nn.Linear(1024, 10)

    def forward(self, x):
        if x.dim() == 3:  # one unbatched image
            x = x.unsqueeze(0)
        x = F.relu(self.conv1(x))
        x = x.view(-1, num_flat_features(x))
        return self.fc2(F.relu(self.fc1(x)))


def test_a_conv_model_reads_as_its_sequential_twin(digits):
    torch.manual_seed(0)
    model = BlitzLeNet().eval()
    twin = nn.Sequential(model.conv1, nn.ReLU(), nn.Flatten(), model.fc1, nn.ReLU(), model.fc2)
    net, ref = fedleak.as_network(model), fedleak.as_network(twin, input_shape=(1, 8, 8))
    assert net.input_shape == ref.input_shape == (1, 8, 8)  # inferred by running the model: its first layer, a conv
    assert [(type(s.layer), s.in_shape, s.out_shape) for s in net.steps] == [
        (type(s.layer), s.in_shape, s.out_shape) for s in ref.steps]
    x, y = digits.batch(4, seed=1)
    got = fedleak.reconstruct(model, sized_gradient(model, x, y))
    want = fedleak.reconstruct(twin, sized_gradient(twin, x, y), input_shape=(1, 8, 8))
    assert got.num_certified == want.num_certified >= 3
    assert torch.equal(got.certified, want.certified) and torch.equal(got.inputs, want.inputs)


class NormedShapes(nn.Module):
    """A BatchNorm1d in training mode and a shape query: tracing runs it on a probe, which must not move it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.bn = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = x.view(-1, num_flat_features(x))
        return self.fc2(F.relu(self.bn(self.fc1(x))))


def test_tracing_leaves_the_models_buffers_as_they_were():
    torch.manual_seed(0)
    model = NormedShapes().train()
    with torch.no_grad():
        model.bn.running_mean.normal_()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shaped_trace(model, (1, 8, 8))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class ValueBranch(nn.Module):
    def __init__(self, branch) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.branch = branch

    def forward(self, x):
        return self.fc(self.branch(x.view(-1, num_flat_features(x))))


# what the client's batch, not a probe, settles: no graph holds it
BRANCHES = {
    "on the values": lambda x: x if x.max() <= 1 else x / 255,
    "on the dtype": lambda x: x.float() / 255 if x.dtype == torch.uint8 else x,
    "on the batch size": lambda x: x if x.size(0) > 1 else x * 1.0,
}


@pytest.mark.parametrize("branch", list(BRANCHES.values()), ids=list(BRANCHES))
def test_a_forward_that_branches_on_the_batch_is_still_refused_and_still_attacked(digits, branch):
    model = ValueBranch(branch).eval()
    refused = r"does not depend on its input's values, dtype or batch size \(its other dimensions may\).*'auto'"
    with pytest.raises(ModelError, match=refused):
        fedleak.as_network(model)
    x, y = digits.batch(1, seed=0)
    update = fedleak.compute_gradient_update(model, x, y)
    rec = fedleak.reconstruct(model, update, attack="auto", seed=0, budget=1.0)
    assert rec.inputs.shape == (1, 64) and not rec.certified.any()  # the input shape found by running it
    # the first-layer attack rebuilds what the first layer read, which is the sample here, but no certificate covers
    # it: what the untraced forward did before that layer is not known
    rec = fedleak.reconstruct(model, update, attack="first-layer")
    assert fedleak.metrics.match(rec, x, y).max_abs_error[0] < 1e-6 and not rec.certified.any()
    assert "is not known" in rec.samples[0].reason


class SquareOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        assert x.shape[-2:] == (8, 8), "expects 8 x 8 images"
        return self.fc(x.flatten(1))


def test_a_shape_that_cannot_be_found_is_asked_for():
    model = SquareOnly().eval()
    with pytest.raises(ModelError, match=r"could not find: .*\(64,\).*expects 8 x 8 images.*pass input_shape="):
        fedleak.as_network(model)
    assert fedleak.as_network(model, input_shape=(1, 8, 8)).input_shape == (1, 8, 8)


def test_a_traced_copy_survives_the_trip_to_an_audit_worker():
    """A federation's audit worker gets a pickled traced copy, rebuilt there by torch.fx's own tracer."""
    import pickle

    from fedleak.federation.template import traced_copy

    torch.manual_seed(0)
    model = BlitzLeNet().eval()
    copy = traced_copy(model)
    assert copy.input_shape == (1, 8, 8)  # the shape it was traced for travels with it
    shipped = pickle.loads(pickle.dumps(copy))
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(shipped(x), model(x))


def test_a_shape_the_model_does_not_take_is_named():
    with pytest.raises(ModelError, match=r"does not run on inputs of shape \(3, 8, 8\) \(.*channels.*pass the right"):
        fedleak.as_network(BlitzLeNet(), input_shape=(3, 8, 8))
