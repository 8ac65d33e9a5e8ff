"""analyze_exclusivity reads models as users write them (nn.Module classes with F.relu, x.view, MaxPool2d,
eval-mode Dropout) with no input_shape, and reports exactly what it reports for their nn.Sequential twins."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from user_models import DropoutMLP, FlowerNet, flower_net_twin

import fedleak


def _numbers(report) -> dict:
    """The report without layer names (the twins name their layers differently)."""
    d = report.to_dict()
    for layer in d["layers"] + d.get("conv_layers", []):
        layer.pop("name")
    return d


def test_flower_net_matches_its_sequential_twin():
    torch.manual_seed(0)
    net = FlowerNet()
    x, y = fedleak.load_dataset("retina").batch(6, seed=0)
    rep = fedleak.analyze_exclusivity(net, x, y, solve=False)  # no input_shape: it comes from the batch
    twin = fedleak.analyze_exclusivity(flower_net_twin(net), x, y, solve=False)
    assert [c.name for c in rep.conv_layers] == ["conv1", "conv2"] and [la.name for la in rep.layers] == ["fc1", "fc2"]
    assert _numbers(rep) == _numbers(twin)
    assert rep.conv_layers[0].units == 6 * 28 * 28 and rep.conv_layers[1].channels == 16
    assert not rep.certifiable.any()  # solve=False: counts only; the head condition is reported apart
    assert rep.head_certifiable is not None and "certifiable" in rep.summary()


def test_dropout_mlp_class_matches_its_sequential_twin(digits):
    torch.manual_seed(1)
    model = DropoutMLP(64, 128, 10).eval()
    twin = nn.Sequential(nn.Flatten(), model.fc1, nn.ReLU(), model.fc2)
    x, y = digits.batch(8, seed=2)
    rep = fedleak.analyze_exclusivity(model, x, y)
    assert _numbers(rep) == _numbers(fedleak.analyze_exclusivity(twin, x, y))
    assert rep.conv_layers == () and "conv_layers" not in rep.to_dict()  # an MLP: the head layers only
    np.testing.assert_array_equal(rep.head_certifiable | rep.peeled, rep.certifiable)
    # labels default to the model's predictions
    assert fedleak.analyze_exclusivity(model, x).labels.tolist() == model(x).argmax(1).tolist()
