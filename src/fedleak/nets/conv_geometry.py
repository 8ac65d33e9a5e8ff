"""Where a convolution's kernel falls on its input: its stride and its zero padding, which may differ on the two
sides of a dimension (a causal ``Conv1d`` padded on the left only, ``padding='same'`` with an even kernel, a
TensorFlow port's ``F.pad(x, (0, 1, 0, 1))`` before a strided conv). The one place that applies a convolution and its
transpose with that padding, for every exact method."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F


@dataclass(frozen=True)
class ConvGeometry:
    """``stride`` (rows, columns), ``padding`` before (top, left) and ``after`` (bottom, right), in zeros, of a
    2-D convolution (a 1-D one's as (C, 1, L) maps: ``(0, left)``, ``(0, right)``)."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    after: tuple[int, int]

    @property
    def symmetric(self) -> bool:
        """Whether both sides of each dimension are padded alike (torch's own ``padding`` then says it)."""
        return self.padding == self.after

    def out_size(self, size: tuple[int, int], kernel: tuple[int, int]) -> tuple[int, int]:
        """The conv output's (H, W) for an input of ``size`` (H, W) and a ``kernel`` (kh, kw)."""
        return tuple((n + a + b - k) // s + 1 for n, a, b, k, s in zip(size, self.padding, self.after, kernel,
                                                                         self.stride))

    def conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The convolution of ``x`` (n x C x H x W) with ``weight`` and ``bias``."""
        if self.symmetric:
            return F.conv2d(x, weight, bias, self.stride, self.padding)
        (top, left), (bottom, right) = self.padding, self.after
        return F.conv2d(F.pad(x, (left, right, top, bottom)), weight, bias, self.stride)

    def transposed(self, shape: tuple[int, ...], weight: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``A^T z``: the gradient, with respect to an input of ``shape`` (n x C x H x W), of the convolution's
        output ``z`` (its transposed convolution)."""
        if self.symmetric:
            return torch.nn.grad.conv2d_input(shape, weight, z, self.stride, self.padding)
        (top, left), (bottom, right) = self.padding, self.after
        n, c, h, w = shape
        padded = torch.nn.grad.conv2d_input((n, c, h + top + bottom, w + left + right), weight, z, self.stride)
        return padded[:, :, top:top + h, left:left + w]
