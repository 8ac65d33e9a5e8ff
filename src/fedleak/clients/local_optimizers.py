"""A simulated client's local optimizer, one step at a time: the direction ``d`` of its step ``p -= lr * d`` for each
parameter, from the parameter's gradient and the optimizer's state for it, as torch's optimizers compute it.

:class:`LocalSGD` is ``torch.optim.SGD`` (momentum, Nesterov, weight decay; Flower's quickstart clients train with
momentum 0.9); :class:`LocalAdam` is ``torch.optim.Adam`` (not AMSGrad). :data:`CLIENT_OPTIMIZERS` builds either by
name from a momentum and a weight decay (``fedleak federate --optimizer``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from fedleak.errors import FedleakError
from fedleak.registry import Registry


class LocalOptimizer(Protocol):
    """What a defended client's loop asks of its optimizer (:func:`~fedleak.clients.defended.defended_local_round`)."""

    def direction(self, grad: torch.Tensor, param: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """The step's direction for ``param`` of gradient ``grad``, and the state after it (``state``: the one
        before, None at the first step)."""
        ...


def _non_negative(owner: str, name: str, value: object) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < float("inf")):
        raise FedleakError(f"the client's {owner} {name} must be a number of 0 or more, got {value!r}")


@dataclass(frozen=True)
class LocalSGD:
    """A client's SGD beyond the plain step, as ``torch.optim.SGD`` takes it: ``momentum`` (dampening 0; ``nesterov``)
    and ``weight_decay`` (``lambda``: ``g + lambda p`` before the momentum). The defaults are the plain step."""

    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False

    def __post_init__(self) -> None:
        for name in ("momentum", "weight_decay"):
            _non_negative("SGD", name, getattr(self, name))
        if self.nesterov and not self.momentum:
            raise FedleakError("Nesterov momentum needs a momentum above 0")

    def direction(self, grad: torch.Tensor, param: torch.Tensor, state: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The step's direction and the momentum buffer after it (``state``: the one before, None at first)."""
        d = grad + self.weight_decay * param if self.weight_decay else grad
        if not self.momentum:
            return d, None
        buffer = d.clone() if state is None else state.mul(self.momentum).add_(d)
        return (d + self.momentum * buffer if self.nesterov else buffer), buffer


@dataclass(frozen=True)
class AdamState:
    """One parameter's Adam moments after ``steps`` steps."""

    first: torch.Tensor
    second: torch.Tensor
    steps: int


@dataclass(frozen=True)
class LocalAdam:
    """A client's Adam, as ``torch.optim.Adam`` takes it (not AMSGrad): ``betas``, ``eps`` and ``weight_decay``
    (``g + lambda p`` before the moments). The step is ``lr m_hat / (sqrt(v_hat) + eps)``: about ``lr`` times the
    sign of the gradient in every entry at the first step, so a one-step change holds no scaled gradient."""

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas):
            raise FedleakError(f"the client's Adam betas must be two numbers in [0, 1), got {self.betas!r}")
        _non_negative("Adam", "eps", self.eps)
        _non_negative("Adam", "weight_decay", self.weight_decay)

    def direction(self, grad: torch.Tensor, param: torch.Tensor, state: AdamState | None
                  ) -> tuple[torch.Tensor, AdamState]:
        """The step's direction and the moments after it (``state``: the moments before, None at first)."""
        g = grad + self.weight_decay * param if self.weight_decay else grad
        b1, b2 = self.betas
        if state is None:
            state = AdamState(torch.zeros_like(g), torch.zeros_like(g), 0)
        first = state.first.lerp(g, 1 - b1)
        second = state.second.mul(b2).addcmul_(g, g, value=1 - b2)
        steps = state.steps + 1
        denom = (second.sqrt() / math.sqrt(1 - b2**steps)).add_(self.eps)
        return first / (1 - b1**steps) / denom, AdamState(first, second, steps)


#: the clients' optimizers by name, each built from the clients' momentum and weight decay
CLIENT_OPTIMIZERS: Registry[Callable[[float, float], LocalOptimizer]] = Registry("client optimizer")
CLIENT_OPTIMIZERS.register("sgd", lambda momentum, weight_decay: LocalSGD(momentum, weight_decay))


def _adam(momentum: float, weight_decay: float) -> LocalAdam:
    if momentum:
        raise FedleakError(f"a momentum of {momentum:g} is SGD's: Adam keeps its own moments (betas 0.9 and 0.999); "
                           "leave the momentum at 0 with the adam optimizer")
    return LocalAdam(weight_decay=weight_decay)


CLIENT_OPTIMIZERS.register("adam", _adam)

PLAIN_SGD = LocalSGD()
