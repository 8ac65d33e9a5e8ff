"""Builders for the fully connected ReLU networks fedleak studies."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from fedleak.errors import ModelError


class MLP(nn.Sequential):
    """``nn.Sequential(Flatten, Linear, ReLU, ..., Linear)`` that remembers its input shape."""

    def __init__(self, layers: Sequence[nn.Module], input_shape: tuple[int, ...]):
        super().__init__(*layers)
        self.input_shape = tuple(input_shape)


def make_mlp(
    input_shape: int | Sequence[int],
    widths: Sequence[int],
    num_classes: int,
    *,
    bias: bool = True,
    seed: int = 0,
) -> MLP:
    """A fully connected ReLU network with PyTorch's default initialisation, seeded.

    ``input_shape`` is the shape of one sample (``(C, H, W)`` or a number of features); ``widths`` are
    the hidden layers' sizes (any depth, including none).
    """
    shape = (int(input_shape),) if isinstance(input_shape, int) else tuple(int(s) for s in input_shape)
    if not shape or any(s <= 0 for s in shape):
        raise ModelError(f"input shape must be positive, got {shape}")
    if num_classes < 2:
        raise ModelError(f"a classifier needs at least 2 classes, got {num_classes}")
    if any(int(w) <= 0 for w in widths):
        raise ModelError(f"hidden widths must be positive, got {list(widths)}")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        sizes = [math.prod(shape), *[int(w) for w in widths], num_classes]
        layers: list[nn.Module] = [nn.Flatten()]
        for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
            layers.append(nn.Linear(n_in, n_out, bias=bias))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        return MLP(layers, shape)
    finally:
        torch.random.set_rng_state(generator_state)
