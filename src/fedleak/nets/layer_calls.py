"""What a model's functional layers read and compute in one forward pass.

A Linear or conv module calls ``F.linear`` / ``F.conv2d`` on its own weight; a model that holds its weights as
parameters calls them itself (``F.linear(x, self.w1, self.b1)``). :class:`FunctionalCalls` catches those calls on
the parameters it is told, with a torch-function mode (whatever code makes the call), and keeps each call's input,
output and bias; modules are caught by their forward hooks instead, which see them whatever function they call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

LAYER_CALLS = (F.linear, F.conv1d, F.conv2d, F.conv3d)  # the functional layers a forward may call on its parameters


@dataclass(frozen=True)
class LayerCall:
    """One call of a functional layer on a watched weight: the weight's name, the input it read, its output, and
    the tensor passed as its bias (None without one)."""

    weight: str
    input: torch.Tensor
    output: torch.Tensor
    bias: torch.Tensor | None


class FunctionalCalls(TorchFunctionMode):
    """Within the block, every call of a functional layer whose weight is one of ``weights`` (``{id(tensor): name}``,
    passed as it is) is kept in :attr:`calls`, in call order; ``first`` keeps only the first. The outputs keep their
    autograd graph (a caller may differentiate through them); the inputs are detached."""

    def __init__(self, weights: dict[int, str], first: bool = False) -> None:
        super().__init__()
        self.weights, self.first = weights, first
        self.calls: list[LayerCall] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in LAYER_CALLS and not (self.first and self.calls):
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            name = self.weights.get(id(weight)) if isinstance(weight, torch.Tensor) else None
            if name is not None:
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                self.calls.append(LayerCall(name, args[0].detach(), out, bias))
        return out
