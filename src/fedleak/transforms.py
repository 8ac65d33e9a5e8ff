"""Client-side batch transforms: code a client runs on each local batch before computing its update.

A curious server that ships the client code can hide a transform in it (fishing, see
:mod:`fedleak.fishing`); a careful client can run one to protect itself (exclusivity reduction, see
:mod:`fedleak.defenses`). Both have this signature, so FL clients, the CLI and the Flower integration
treat them alike.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class BatchTransform(Protocol):
    """``transform(model, inputs, labels) -> (inputs, labels)``, applied before the update is computed.

    It may change the inputs (a perturbation) or the batch itself (re-composition); it must not train
    the model. The server's attack never sees what a transform returns, only the resulting update.
    """

    def __call__(
        self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ...


class Identity:
    """The transform of an honest client: the batch as it is."""

    def __call__(
        self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return inputs, labels
