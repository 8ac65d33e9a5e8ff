"""The typed layers of a :class:`~fedleak.nets.Network`: what each step of the user's model computes.

Every layer keeps the user's own module (so its weights stay live: an update applied to the model is seen
here; a Linear layer written ``F.linear(x, self.w, self.b)`` keeps the module that holds those parameters) and the
names of its parameters in ``model.named_parameters()`` (``conv1.weight``), so updates keyed by those names just
work. Shapes are per sample (no batch dimension).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from fedleak.nets.conv_geometry import ConvGeometry


@dataclass(frozen=True, eq=False)
class HeldWeights:
    """A layer whose weight and bias a module of the model holds: ``owner``, as its attributes ``weight_attr`` and
    ``bias_attr`` (None without a bias), named ``weight_name`` and ``bias_name`` in ``model.named_parameters()``;
    the layer's own module, or the module whose parameters a functional call reads (``functional``: ``F.linear(x,
    self.w1, self.b1)``, ``F.conv2d(x, self.k, self.c)``). They are read from it live."""

    name: str
    owner: nn.Module
    weight_name: str
    bias_name: str | None
    weight_attr: str = field(default="weight", kw_only=True)
    bias_attr: str | None = field(default="bias", kw_only=True)
    functional: bool = field(default=False, kw_only=True)

    @property
    def held_weight(self) -> torch.Tensor:
        """The weight as the model holds it."""
        return getattr(self.owner, self.weight_attr)

    @property
    def bias(self) -> torch.Tensor | None:
        return None if self.bias_attr is None else getattr(self.owner, self.bias_attr)

    def tensors(self) -> list[torch.Tensor]:
        """The weight and the bias (where there is one)."""
        return [self.held_weight] + ([self.bias] if self.bias is not None else [])

    def parameter_names(self) -> list[str]:
        return [self.weight_name] + ([self.bias_name] if self.bias_name else [])


@dataclass(frozen=True, eq=False)
class Dense(HeldWeights):
    """A Linear layer on flat inputs: an ``nn.Linear`` module, or ``F.linear`` of parameters of the model."""

    @property
    def weight(self) -> torch.Tensor:
        return self.held_weight

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])


@dataclass(frozen=True, eq=False)
class Conv(HeldWeights):
    """A 2-D or 1-D convolution (groups 1, dilation 1, zero padding) with its resolved padding and stride, as a 2-D
    convolution: one over (C, L) signals is one over (C, 1, L) maps with a 1 x k kernel. An ``nn.Conv2d`` /
    ``nn.Conv1d`` module, or ``F.conv2d`` / ``F.conv1d`` of parameters of the model. ``padding`` is the zeros before
    (top, left), ``after`` those after (bottom, right) where they differ (None: the same)."""

    padding: tuple[int, int]
    stride: tuple[int, int]
    after: tuple[int, int] | None = field(default=None, kw_only=True)

    @property
    def geometry(self) -> ConvGeometry:
        """Its stride and padding (:class:`~fedleak.nets.conv_geometry.ConvGeometry`)."""
        return ConvGeometry(self.stride, self.padding, self.padding if self.after is None else self.after)

    @property
    def kernel(self) -> tuple[int, int]:
        """The kernel's (kh, kw): (1, k) for a 1-D convolution."""
        size = tuple(int(k) for k in self.held_weight.shape[2:])
        return (1, size[0]) if len(size) == 1 else size

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The kernel, C_out x C_in x kh x kw (a 1-D one's with kh = 1), detached, in ``dtype``."""
        w = self.held_weight.detach().to(dtype)
        return w[:, :, None, :] if w.dim() == 3 else w


@dataclass(frozen=True, eq=False)
class BatchNorm:
    """An eval-mode ``nn.BatchNorm2d`` (or ``nn.BatchNorm1d`` after a ``Conv1d``; running statistics); folded into
    the convolution before it."""

    name: str
    module: nn.BatchNorm2d | nn.BatchNorm1d
    weight_name: str | None
    bias_name: str | None

    def affine(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel ``scale`` and ``shift`` with ``bn(z) = scale * z + shift``."""
        bn = self.module
        scale = 1.0 / torch.sqrt(bn.running_var.detach().to(dtype) + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.detach().to(dtype)
        shift = -bn.running_mean.detach().to(dtype) * scale
        if bn.bias is not None:
            shift = shift + bn.bias.detach().to(dtype)
        return scale, shift

    def parameter_names(self) -> list[str]:
        return [n for n in (self.weight_name, self.bias_name) if n]


@dataclass(frozen=True)
class Pool:
    """Non-overlapping max or average pooling (kernel == stride, no padding) over (C, H, W) maps."""

    name: str
    kind: str  # "max" or "avg"
    kernel: tuple[int, int]

    @property
    def text(self) -> str:
        """``"2x2 max pooling"``."""
        return f"{self.kernel[0]}x{self.kernel[1]} {self.kind} pooling"

    def apply(self, a: torch.Tensor) -> torch.Tensor:
        fn = F.max_pool2d if self.kind == "max" else F.avg_pool2d
        return fn(a, self.kernel, self.kernel)

    def parameter_names(self) -> list[str]:
        return []


@dataclass(frozen=True)
class Reshape:
    """A flatten, ``view`` or ``reshape`` of each sample; row-major, so the flat order never changes."""

    name: str
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def parameter_names(self) -> list[str]:
        return []


@dataclass(frozen=True)
class Pad:
    """Zero padding of (C, H, W) maps (or (C, L) signals, as (C, 1, L) maps): ``padding`` (top, left) before and
    ``after`` (bottom, right); read into the convolution that follows it, as its own padding."""

    name: str
    padding: tuple[int, int]
    after: tuple[int, int]

    def parameter_names(self) -> list[str]:
        return []


@dataclass(frozen=True)
class Relu:
    """A ReLU (module, functional or in place)."""

    name: str

    def parameter_names(self) -> list[str]:
        return []


@dataclass(frozen=True)
class Dropout:
    """An eval-mode Dropout of rate ``p`` > 0: the identity in the chain. The network notes it (a client that runs
    it in training mode drops random units of every sample, which no exact method models)."""

    name: str
    p: float

    def parameter_names(self) -> list[str]:
        return []


Layer = Dense | Conv | BatchNorm | Pool | Pad | Reshape | Relu | Dropout
