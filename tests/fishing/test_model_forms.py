"""fish and reduce_exclusivity take models as users write them (Flower's quickstart Net with F.relu, x.view
and MaxPool2d; an MLP class with F.relu and eval-mode Dropout), with no input_shape, and give exactly the
results of their nn.Sequential twins with the same weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from user_models import DropoutMLP, FlowerNet, flower_net_twin

import fedleak
from fedleak.defenses import ExclusivityReduction, reduce_exclusivity
from fedleak.fishing import fish


def _same(a, b) -> None:
    """Two fishing / reduction results are the same (up to wall-clock times)."""
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    assert a.data_range == b.data_range
    drop = ("lp_seconds", "lp_floor_seconds")
    assert [{k: v for k, v in s.to_dict().items() if k not in drop} for s in a.samples] == \
           [{k: v for k, v in s.to_dict().items() if k not in drop} for s in b.samples]


def test_flower_net_is_fished_like_its_sequential_twin():
    torch.manual_seed(0)
    net = FlowerNet()
    twin = flower_net_twin(net)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # CIFAR-10-sized images
    y = torch.tensor([3, 7])
    res = fish(net, x, y, solve_check=False)
    _same(res, fish(twin, x, y, solve_check=False))
    assert res.inputs.shape == x.shape and float(res.inputs.min()) >= 0 and float(res.inputs.max()) <= 1
    assert res.certifiable_after.all() and not res.certifiable_before.all()
    # both ReLU layers of the head got their targets: 1 in fc1, 2 in fc2
    assert all([len(t) for t in s.targets] == [1, 2] for s in res.samples)
    report = fedleak.analyze_exclusivity(net, res.inputs, y, solve=False)  # float32, as the client computes
    assert report.head_certifiable.all()


def test_flower_net_reduction_matches_its_twin():
    torch.manual_seed(0)
    net = FlowerNet()
    twin = flower_net_twin(net)
    x, y = fedleak.load_dataset("retina").batch(2, seed=0)
    res = reduce_exclusivity(net, x, y, budget=0.01)  # too small for this ExAN: the samples are dropped
    _same(res, reduce_exclusivity(twin, x, y, budget=0.01))
    assert res.protected and sum(s.exans_before for s in res.samples) > 0


def test_flower_net_batch_is_reduced_not_dropped():
    # its max-pooling windows over flat patches of the photograph hold gaps of 1e-7 between the conv units, which
    # the LP must keep on their side: held 2.5e-7 clear (a fraction of the layer's largest gap) they came back a
    # polish's slack short, and every sample was dropped with "rows hold in the LP but not in the forward pass"
    torch.manual_seed(5)
    net = FlowerNet()
    x, y = fedleak.load_dataset("retina").batch(2, seed=5)
    res = reduce_exclusivity(net, x, y)
    assert sum(s.exans_before for s in res.samples) >= 1
    assert res.protected and len(res.kept) == 2, [s.message for s in res.samples]


def test_a_client_in_training_mode_reduces_for_the_eval_mode_network(fashion):
    # a simulated client runs model.train() while it defends and trains; the defense reads the network the exact
    # attack reads (Dropout the identity) and leaves the model in training mode
    torch.manual_seed(2)
    model = DropoutMLP(784, 512, 10).train()
    x, y = fashion.batch(8, seed=4)
    defense = ExclusivityReduction()
    xd, yd = defense(model, x, y)
    assert model.training and model.dropout.training
    assert defense.last_result.protected and len(xd) == len(yd) >= 7
    assert torch.equal(xd, reduce_exclusivity(model.eval(), x, y).inputs)


def test_dropout_mlp_class_is_fished_and_reduced_like_its_twin(fashion):
    torch.manual_seed(2)
    model = DropoutMLP(784, 512, 10).eval()
    twin = nn.Sequential(nn.Flatten(), model.fc1, nn.ReLU(), model.fc2)
    x, y = fashion.batch(10, seed=4)
    res = fish(model, x, y)
    _same(res, fish(twin, x, y))
    assert res.certifiable_after.all()
    red, red_twin = reduce_exclusivity(model, x[:8], y[:8]), reduce_exclusivity(twin, x[:8], y[:8])
    _same(red, red_twin)
    assert red.protected and (red.kept == red_twin.kept).all()


def test_a_model_no_perturbation_can_certify_is_refused_before_any_lp():
    """Flower's Net: each 2x2 max-pooled conv layer has fewer outputs than inputs, so no batch, fished or not, can
    be certified; fishing for the full condition says so at once, naming both layers and what to do."""
    torch.manual_seed(0)
    net = FlowerNet()
    x, y = fedleak.load_dataset("retina").batch(4, seed=0)
    with pytest.raises(fedleak.FedleakError) as err:
        fish(net, x, y)
    text = str(err.value)
    assert "conv layer 'conv1' gives at most 1176 equations (6 x 14 x 14 after 2x2 max pooling) for 3072" in text
    assert "conv layer 'conv2' gives at most 400 equations" in text and "solve_check=False" in text
    with pytest.raises(fedleak.FedleakError, match="conv1"):  # the shipped client hook too
        fedleak.FishingTransform()(net, x, y)
