"""What is already known of a batch before an optimisation attack searches it (``auto``'s exact route).

Samples known exactly (certified) are passed as ``fixed_inputs`` / ``fixed_labels`` and held fixed. The rest
of what another attack found is a :class:`Prior`: uncertified estimates (a label, why it is not certified and,
where one was rebuilt, an input the search starts from), the batch's label counts, and why the samples nobody
found are unknown. :func:`place_estimates` puts the estimates into the search's free slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Estimate:
    """One sample another attack found but did not certify: its label, why it is not certified, and its
    rebuilt input when there is one (``None``: only the label and the reason are known)."""

    label: int
    reason: str
    inputs: torch.Tensor | None = None


@dataclass(frozen=True)
class Prior:
    """What an optimisation attack starts from besides its random initialisation.

    ``estimates``: uncertified samples, best first; those with an input seed a free slot of their label (the
    search moves them with ``warm_lr`` times its learning rate). ``label_counts``: the whole batch's label
    histogram, when another attack inferred it. ``reason``: why the free samples no estimate covers are not
    known (it starts their ``SampleRecovery.reason``).
    """

    estimates: tuple[Estimate, ...] = ()
    label_counts: np.ndarray | None = None
    reason: str = ""


@dataclass(frozen=True)
class Placement:
    """The free slots of a search: their labels (warm-started slots first), the starting inputs of the first
    ``len(warm)`` slots, and each slot's reason (why it is not known)."""

    labels: torch.Tensor
    warm: torch.Tensor | None
    reasons: tuple[str, ...]

    @property
    def num_warm(self) -> int:
        return 0 if self.warm is None else int(self.warm.shape[0])


def place_estimates(prior: Prior | None, free_labels: torch.Tensor) -> Placement:
    """Give each estimate a free slot of its label (estimates with an input first, in the prior's order); slots
    left over keep ``prior.reason``."""
    labels = [int(v) for v in free_labels.tolist()]
    if prior is None:
        return Placement(free_labels.long(), None, ("",) * len(labels))
    left = list(labels)
    warm_x, warm_y, warm_why, other_y, other_why = [], [], [], [], []
    for est in sorted(prior.estimates, key=lambda e: e.inputs is None):  # stable: with an input first
        if est.label not in left:
            continue
        left.remove(est.label)
        if est.inputs is not None:
            warm_x.append(est.inputs)
            warm_y.append(est.label)
            warm_why.append(est.reason)
        else:
            other_y.append(est.label)
            other_why.append(est.reason)
    order = warm_y + other_y + left
    reasons = tuple(warm_why + other_why + [prior.reason] * len(left))
    warm = torch.stack([x.detach() for x in warm_x]) if warm_x else None
    return Placement(torch.tensor(order, dtype=torch.long), warm, reasons)
