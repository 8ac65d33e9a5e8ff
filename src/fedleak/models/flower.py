"""Flower's quickstart-pytorch model, exactly as Flower writes it (CIFAR-10, 3 x 32 x 32 inputs).

It is the model most Flower users start from, so ``fedleak check --model flower-cnn`` explains what the exact
route can and cannot do on it. fedleak reads it as written (``F.relu``, ``x.view`` and a shared max pooling
module); nothing here is adapted for fedleak.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FlowerNet(nn.Module):
    """Flower's quickstart ``Net``: two 5x5 convs, each followed by 2x2 max pooling, then fc 400 -> 120 -> 84 -> 10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * 5 * 5)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)
