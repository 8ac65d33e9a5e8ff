"""Whose gradient row a neuron's is: each sample's share of it, and which shares the client's sum can hear.

A hidden neuron's gradient row (its weights' and its bias's entries) is the sum of one term per sample that fires
it: the sample's backward signal there times its input to the layer (and 1, the bias's). A sample's *share* of
the row is the norm of its term. A share below an epsilon of the model's dtype times the largest share on the row
vanishes in the client's sum: its rounding hides it. The row then reads as the loud samples' alone, so a sample
the model classifies with probability 1 (its loss vector zero, or holding only entries that small) fires neurons
without taking them from the one sample whose row it is -- the exact attack reads such a row as that sample's
(a model fed raw 0..255 pixels classifies many samples so), and exclusivity counts it so
(:func:`fedleak.analyze_exclusivity`, :mod:`fedleak.plan`).
"""

from __future__ import annotations

import torch


def row_shares(preactivations: torch.Tensor, deltas: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """(M, width) each sample's share of each neuron's gradient row (module docstring): ``|delta|`` times the norm
    of the sample's ``inputs`` to the layer with the bias's 1, where the neuron fires (``preactivations > 0``), else
    0; in the dtype of the pass."""
    norm = torch.hypot(torch.linalg.vector_norm(inputs.flatten(1), dim=1), torch.ones((), dtype=inputs.dtype,
                                                                                     device=inputs.device))
    return torch.where(preactivations > 0, deltas.abs() * norm[:, None], torch.zeros((), dtype=deltas.dtype,
                                                                                     device=deltas.device))


def heard(shares: torch.Tensor) -> torch.Tensor:
    """Per sample and neuron (the samples along ``shares``' second-to-last axis, any leading batch axes): whether
    the sample's share is heard in the row's sum -- above an epsilon of the shares' dtype times the largest on the
    row (module docstring). A sample left out of the batch holds share 0: never heard."""
    eps = torch.finfo(shares.dtype).eps
    return shares > eps * shares.amax(-2, keepdim=True)


def heard_alone(shares: torch.Tensor) -> torch.Tensor:
    """Per sample and neuron (as :func:`heard`): whether the sample is the only one heard on the neuron's row."""
    loud = heard(shares)
    return loud & (loud.sum(-2, keepdim=True, dtype=torch.int32) == 1)


def quiet(shares: torch.Tensor) -> torch.Tensor:
    """Per sample and neuron (as :func:`heard`): a non-zero share at most an epsilon of the row's largest -- heard
    in a batch of these samples or not as the louder ones come and go. A zero share is never heard; any other
    share is heard in every batch."""
    return (shares > 0) & ~heard(shares)
