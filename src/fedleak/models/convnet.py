"""A builder for the convolutional ReLU networks fedleak's exact methods handle.

``make_convnet`` builds ``( Conv2d [BatchNorm2d (eval)] ReLU [MaxPool2d | AvgPool2d] )+  Flatten
Linear (ReLU Linear)+``; users' own CNNs of that form (written as ``nn.Module`` classes or ``nn.Sequential``)
are read by :func:`fedleak.nets.as_network`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fedleak.errors import ModelError


class ConvNet(nn.Sequential):
    """``nn.Sequential`` CNN that remembers its input shape (C, H, W)."""

    def __init__(self, layers: Sequence[nn.Module], input_shape: tuple[int, ...]):
        super().__init__(*layers)
        self.input_shape = tuple(input_shape)


def make_convnet(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    channels: Sequence[int] = (8, 16),
    kernel: int = 3,
    padding: int = 0,
    pool: str | None = None,
    pool_layers: Sequence[int] | None = None,
    fc_widths: Sequence[int] = (512,),
    batch_norm: bool = False,
    bias: bool = True,
    seed: int = 0,
) -> ConvNet:
    """A ConvNet: per entry of ``channels`` a ``Conv2d(kernel, stride 1, padding) ReLU [pool]`` block, then
    ``Flatten`` and a ReLU head of ``fc_widths`` with ``num_classes`` outputs. PyTorch's default init, seeded.

    ``pool`` is None, ``"avg"`` or ``"max"`` (2x2); it follows the blocks listed in ``pool_layers``
    (0-based; default: every block). ``batch_norm`` inserts an eval-mode BatchNorm2d after each conv
    (with seeded, non-trivial running statistics, as after training).
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) <= 0:
        raise ModelError(f"make_convnet needs a positive input shape (C, H, W), got {shape}")
    if num_classes < 2:
        raise ModelError(f"a classifier needs at least 2 classes, got {num_classes}")
    if not channels or min(int(c) for c in channels) <= 0:
        raise ModelError(f"channels must be a non-empty list of positive sizes, got {list(channels)}")
    if not fc_widths or min(int(w) for w in fc_widths) <= 0:
        raise ModelError(f"fc_widths must hold at least one positive width, got {list(fc_widths)}")
    if pool not in (None, "avg", "max"):
        raise ModelError(f"pool must be None, 'avg' or 'max', got {pool!r}")
    pooled = set(range(len(channels))) if pool_layers is None else {int(p) for p in pool_layers}
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        layers: list[nn.Module] = []
        c, h, w = shape
        for k, co in enumerate(int(c) for c in channels):
            layers.append(nn.Conv2d(c, co, kernel, padding=padding, bias=bias))
            h, w = h + 2 * padding - kernel + 1, w + 2 * padding - kernel + 1
            if batch_norm:
                bn = nn.BatchNorm2d(co)
                with torch.no_grad():
                    bn.running_mean.uniform_(-0.1, 0.1)
                    bn.running_var.uniform_(0.5, 2.0)
                    bn.weight.uniform_(0.5, 1.5)
                    bn.bias.uniform_(-0.1, 0.1)
                layers.append(bn)
            layers.append(nn.ReLU())
            if pool is not None and k in pooled:
                layers.append(nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2))
                h, w = h // 2, w // 2
            if h <= 0 or w <= 0:
                raise ModelError(f"the input {shape} is too small for {len(channels)} conv blocks")
            c = co
        layers.append(nn.Flatten())
        sizes = [c * h * w, *[int(x) for x in fc_widths], num_classes]
        for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
            layers.append(nn.Linear(n_in, n_out, bias=bias))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        net = ConvNet(layers, shape)
        return net.eval() if batch_norm else net
    finally:
        torch.random.set_rng_state(state)
