"""Running a user's model without changing it: its buffers (BatchNorm's running statistics, its batch counter),
which a forward pass in training mode moves, are restored afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def buffers_kept(model: nn.Module) -> Iterator[None]:
    """Within this block the model may run in any mode, with or without autograd; its buffers are as they were
    after it."""
    saved = {name: buf.detach().clone() for name, buf in model.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, buf in model.named_buffers():
                if not torch.equal(buf, saved[name]):  # only what changed: a copy bumps the tensor's version, by
                    buf.copy_(saved[name])  # which readers of the model (its folded twin) tell a changed model
