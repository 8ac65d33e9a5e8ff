"""The batches the certificate hunts attack: a data set's batch as drawn, or a sample and its copies moved by noise of
1e-3 (one label), the hardest case for a certificate (a blend of near-copies reads as one sample)."""

from __future__ import annotations

import torch

import fedleak


def hunt_batch(data: fedleak.Dataset, size: int, seed: int, copies: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` samples of ``data`` (``seed``), or, with ``copies``, its first and ``size - 1`` noisy copies of it."""
    x, y = data.batch(size, seed=seed)
    if copies and size > 1:
        noise = 1e-3 * torch.randn(size - 1, *x.shape[1:], generator=torch.Generator().manual_seed(seed))
        lo, hi = data.value_range
        x = torch.cat([x[:1], (x[:1] + noise).clamp(lo, hi)])
        y = y[:1].repeat(size)
    return x, y
