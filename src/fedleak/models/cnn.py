"""A small LeNet-style CNN (the architecture of the DLG / DLM experiments), seeded."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fedleak.errors import ModelError

_ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid}


class LeNet(nn.Sequential):
    """``nn.Sequential`` of three 5x5 convolutions (12 channels each) and a linear classifier.

    Like :class:`fedleak.models.MLP` it remembers ``input_shape`` (C, H, W).
    """

    def __init__(self, layers: Sequence[nn.Module], input_shape: tuple[int, ...]):
        super().__init__(*layers)
        self.input_shape = tuple(input_shape)


def make_lenet(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    activation: str = "relu",
    channels: int = 12,
    seed: int = 0,
) -> LeNet:
    """LeNet of Zhu et al. (DLG): conv 5x5 stride 2, conv 5x5 stride 2, conv 5x5 stride 1, then Linear.

    ``input_shape`` is ``(C, H, W)``; ``activation`` is ``"relu"`` or ``"sigmoid"`` (DLG and DLM use
    sigmoid, whose second derivative is non-zero everywhere). PyTorch's default initialisation, seeded.
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or any(s <= 0 for s in shape):
        raise ModelError(f"make_lenet needs a positive input shape (C, H, W), got {shape}")
    if num_classes < 2:
        raise ModelError(f"a classifier needs at least 2 classes, got {num_classes}")
    if activation not in _ACTIVATIONS:
        raise ModelError(f"activation must be one of {sorted(_ACTIVATIONS)}, got '{activation}'")
    if channels < 1:
        raise ModelError(f"channels must be positive, got {channels}")
    act = _ACTIVATIONS[activation]
    c, h, w = shape

    def out(n: int, stride: int) -> int:
        return (n + 2 * 2 - 5) // stride + 1

    h2, w2 = out(out(out(h, 2), 2), 1), out(out(out(w, 2), 2), 1)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        layers: list[nn.Module] = [
            nn.Conv2d(c, channels, 5, padding=2, stride=2), act(),
            nn.Conv2d(channels, channels, 5, padding=2, stride=2), act(),
            nn.Conv2d(channels, channels, 5, padding=2, stride=1), act(),
            nn.Flatten(),
            nn.Linear(channels * h2 * w2, num_classes),
        ]
        return LeNet(layers, shape)
    finally:
        torch.random.set_rng_state(state)
