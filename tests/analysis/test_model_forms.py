"""analyze_exclusivity reads models as users write them (nn.Module classes with F.relu, x.view, MaxPool2d,
eval-mode Dropout) with no input_shape, and reports exactly what it reports for their nn.Sequential twins."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import fedleak


class FlowerNet(nn.Module):
    """Flower's quickstart-pytorch CIFAR-10 model, exactly as Flower writes it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * 5 * 5)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def flower_twin(net: FlowerNet) -> nn.Sequential:
    return nn.Sequential(net.conv1, nn.ReLU(), nn.MaxPool2d(2), net.conv2, nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         net.fc1, nn.ReLU(), net.fc2, nn.ReLU(), net.fc3)


class DropoutMLP(nn.Module):
    def __init__(self, d: int, width: int, classes: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, width)
        self.drop = nn.Dropout(0.5)
        self.fc2 = nn.Linear(width, classes)

    def forward(self, x):
        return self.fc2(self.drop(F.relu(self.fc1(torch.flatten(x, 1)))))


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
    twin = fedleak.analyze_exclusivity(flower_twin(net), x, y, solve=False)
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
    np.testing.assert_array_equal(rep.head_certifiable, rep.certifiable)
    # labels default to the model's predictions
    assert fedleak.analyze_exclusivity(model, x).labels.tolist() == model(x).argmax(1).tolist()
