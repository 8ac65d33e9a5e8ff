"""Conv blocks: the equations the exact route reads against the unknowns it must find, counted as the attack does.

Walking the rebuilt features down a block ``out = pool(relu(A x + c))`` (:func:`fedleak.attacks.exact.invert_block`),
the attack reads one equation per non-zero output unit of a sample:

* without pooling, every active unit gives ``A_u x + c_u = out_u``; the input is determined when these rows have
  full column rank, so the sample needs **at least as many active units as the block has inputs**, and then the
  attack solves and proves it (band Cholesky);
* with pooling, a non-zero pooled unit gives one equation of its window; the attack tries only when the sample
  has **more non-zero pooled units than unknowns**, and then needs a uniqueness proof (convexity and a Gordan
  certificate) that max-pooled blocks rarely pass (docs/cnn.md), so a pooled block is at best unproven.

:class:`BlockShape` is the arithmetic of one block (shapes, counts, parameters); a changed block (more channels, no
pooling) is a changed shape, counted on the inputs by :mod:`fedleak.plan.convgrow`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from fedleak.nets import ConvBlock
from fedleak.nets.blocks import equations_needed
from fedleak.nets.conv_geometry import ConvGeometry


@dataclass(frozen=True)
class BlockShape:
    """One conv block's arithmetic: ``in_shape`` (C, H, W), ``channels`` out, kernel, stride, zero padding, and
    its non-overlapping pooling window (``pool``, None without; ``pool_kind`` ``"max"`` or ``"avg"``)."""

    name: str
    in_shape: tuple[int, int, int]
    channels: int
    kernel: tuple[int, int]
    geometry: ConvGeometry
    pool: tuple[int, int] | None
    pool_kind: str | None
    bias: bool
    batch_norm: bool

    @property
    def conv_shape(self) -> tuple[int, int, int]:
        _, h, w = self.in_shape
        return (self.channels, *self.geometry.out_size((h, w), self.kernel))

    @property
    def out_shape(self) -> tuple[int, int, int]:
        c, h, w = self.conv_shape
        return (c, h, w) if self.pool is None else (c, h // self.pool[0], w // self.pool[1])

    @property
    def unknowns(self) -> int:
        return math.prod(self.in_shape)

    @property
    def units(self) -> int:
        """Conv units before pooling."""
        return math.prod(self.conv_shape)

    @property
    def max_equations(self) -> int:
        """Output units: the most equations a sample can give."""
        return math.prod(self.out_shape)

    @property
    def needed(self) -> int:
        """Equations a sample needs before the attack tries: as many as unknowns, more than that when pooled."""
        return equations_needed(self.unknowns, self.pool is not None)

    @property
    def parameters(self) -> int:
        c_in = self.in_shape[0]
        return (c_in * self.channels * self.kernel[0] * self.kernel[1] + (self.channels if self.bias else 0)
                + (2 * self.channels if self.batch_norm else 0))

    @property
    def pool_text(self) -> str:
        return "" if self.pool is None else f"{self.pool[0]}x{self.pool[1]} {self.pool_kind} pooling"

    def changed(self, *, in_shape: tuple[int, int, int] | None = None, channels: int | None = None,
                unpooled: bool = False) -> BlockShape:
        return replace(self, in_shape=self.in_shape if in_shape is None else in_shape,
                       channels=self.channels if channels is None else channels,
                       pool=None if unpooled else self.pool, pool_kind=None if unpooled else self.pool_kind)


def block_shape(blk: ConvBlock) -> BlockShape:
    return BlockShape(
        name=blk.name, in_shape=tuple(blk.in_shape), channels=blk.conv_shape[0], kernel=blk.conv.kernel,
        geometry=blk.conv.geometry,
        pool=None if blk.pool is None else tuple(blk.pool.kernel),
        pool_kind=None if blk.pool is None else blk.pool.kind,
        bias=blk.conv.bias is not None, batch_norm=blk.bn is not None,
    )
