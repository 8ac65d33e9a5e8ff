"""More channels for conv blocks, counted on the inputs: the conv part of a proposed change, measured, not scaled.

A changed block reads a changed input (more channels, or a larger map once the pooling below is removed), so its
share of active units is not the measured block's. Each changed block is therefore built and run on the inputs:
its own (BN-folded) weights where they exist, and every added channel -- and every added input slice of an existing
channel -- drawn like the layer's own weights (Gaussian with the mean and spread of its weights and biases), one
seeded draw per output channel, so channels come in a fixed order and more channels only add equations. Blocks are
chosen from the input up: the fewest channels (never fewer than now) whose non-zero units reach the block's
count on enough of the inputs, then the next block reads their output.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from fedleak.nets import ConvBlock
from fedleak.plan.conv import BlockShape

CHUNK = 128  # inputs per forward pass
MAX_CHANNELS = 1024  # the most channels a proposed block may ask for
CHOOSE_SAMPLES = 256  # inputs the channel counts are chosen on (every input checks the result)


@dataclass(frozen=True)
class GrownBlock:
    """A block as proposed: its shape, its weights (C x C_in x kh x kw) and bias, and its pooling (None: none)."""

    shape: BlockShape
    weight: torch.Tensor
    bias: torch.Tensor

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        """The block's output for inputs ``a`` (n x C_in x H x W)."""
        z = torch.relu(self.shape.geometry.conv(a, self.weight, self.bias))
        if self.shape.pool is None:
            return z
        pool = F.max_pool2d if self.shape.pool_kind == "max" else F.avg_pool2d
        return pool(z, self.shape.pool, self.shape.pool)


def draw_weights(blk: ConvBlock, index: int, in_channels: int, channels: int, seed: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The block's folded weights widened to ``channels`` x ``in_channels``: its own where they exist, the rest drawn
    like them (seeded per output channel)."""
    w0, b0 = (t.detach().to(torch.float32).cpu() for t in blk.folded(torch.float64))
    c0, cin0, kh, kw = w0.shape
    mu_w, s_w = float(w0.mean()), float(w0.std()) if w0.numel() > 1 else 0.0
    mu_b, s_b = float(b0.mean()), float(b0.std()) if b0.numel() > 1 else 0.0
    weight = torch.empty(channels, in_channels, kh, kw)
    bias = torch.empty(channels)
    for o in range(channels):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * index + o)
        weight[o] = mu_w + s_w * torch.randn(in_channels, kh, kw, generator=gen)
        bias[o] = mu_b + s_b * torch.randn(1, generator=gen)
    keep_in, keep_out = min(cin0, in_channels), min(c0, channels)
    weight[:keep_out, :keep_in] = w0[:keep_out, :keep_in]
    bias[:keep_out] = b0[:keep_out]
    return weight, bias


def _lower(x: torch.Tensor, blocks: list[GrownBlock]) -> torch.Tensor:
    a = x
    for blk in blocks:
        a = blk.forward(a)
    return a


def _per_channel(x: torch.Tensor, below: list[GrownBlock], trial: GrownBlock) -> np.ndarray:
    """Per input and channel of ``trial`` (n x C): its non-zero output units, on the outputs of ``below``."""
    parts = []
    with torch.no_grad():
        for start in range(0, x.shape[0], CHUNK):
            out = trial.forward(_lower(x[start:start + CHUNK], below))
            parts.append((out > 0).flatten(2).sum(2).numpy())
    return np.concatenate(parts)


def equations(x: torch.Tensor, blocks: list[GrownBlock]) -> np.ndarray:
    """Per block and input (blocks x n): the non-zero output units of each block of the stack."""
    counts = [[] for _ in blocks]
    with torch.no_grad():
        for start in range(0, x.shape[0], CHUNK):
            a = x[start:start + CHUNK]
            for i, blk in enumerate(blocks):
                a = blk.forward(a)
                counts[i].append((a > 0).flatten(1).sum(1).numpy())
    return np.stack([np.concatenate(c) for c in counts])


def grow_block(blk: ConvBlock, index: int, shape: BlockShape, x: torch.Tensor, below: list[GrownBlock],
               target: float, seed: int) -> GrownBlock | None:
    """``shape`` (the block on its new input, with or without pooling) with the fewest channels, at least its own,
    whose equations reach its count on at least ``target`` of the inputs ``x`` (run through ``below``); None
    beyond :data:`MAX_CHANNELS`."""
    low = shape.channels
    top = max(2 * low, 8)
    while True:
        weight, bias = draw_weights(blk, index, shape.in_shape[0], top, seed)
        trial = GrownBlock(shape.changed(channels=top), weight, bias)
        cumulative = _per_channel(x, below, trial).cumsum(1)  # n x top: equations of the first c channels
        met = (cumulative >= shape.needed).mean(0)
        good = np.nonzero(met[low - 1:] >= target)[0]
        if len(good):
            c = low + int(good[0])
            return GrownBlock(shape.changed(channels=c), weight[:c].clone(), bias[:c].clone())
        if top >= MAX_CHANNELS:
            return None
        top = min(2 * top, MAX_CHANNELS)


def own_block(blk: ConvBlock, shape: BlockShape, index: int, seed: int) -> GrownBlock:
    """The block as it is (its own folded weights)."""
    weight, bias = draw_weights(blk, index, shape.in_shape[0], shape.channels, seed)
    return GrownBlock(shape, weight, bias)


def choose_inputs(x: torch.Tensor) -> torch.Tensor:
    """The inputs channel counts are chosen on (the first :data:`CHOOSE_SAMPLES`; they are a random subset already)."""
    return x[: min(len(x), CHOOSE_SAMPLES)].to(torch.float32)
