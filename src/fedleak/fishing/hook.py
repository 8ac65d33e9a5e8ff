"""The deployment model (spec §4.2): fishing as a client-side batch transform.

A curious server ships client code that runs ``FishingTransform`` on every local batch before the
update is computed; the client then uploads an ordinary update, and the server's attack sees nothing but
that update. ``last_result`` keeps the client-side statistics for auditing (the server never gets them).
"""

from __future__ import annotations

import torch
from torch import nn

from fedleak.clients.mode import client_mode
from fedleak.fishing.fisher import fish
from fedleak.fishing.perturb import FishingOptions, FishingResult


class FishingTransform:
    """``BatchTransform`` that fishes each batch: ``FishingTransform(**options)(model, x, y) -> (x', y)``.

    Options are those of :func:`fedleak.fish` (:class:`FishingOptions`); they are checked when the
    transform is built. Labels are passed through unchanged. ``workers`` defaults to 1 here: a client
    fishes in its own process (a simulated federation already runs its clients in parallel).
    """

    def __init__(self, **options) -> None:
        options.setdefault("workers", 1)
        self.options = FishingOptions.from_kwargs(**options)
        self.last_result: FishingResult | None = None

    def __call__(
        self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with client_mode(model, "eval"):  # the server's code reads the network it sent, in eval mode
            result = fish(model, inputs, labels, options=self.options)
        self.last_result = result
        return result.inputs, labels

    def __repr__(self) -> str:
        return f"FishingTransform({self.options})"
