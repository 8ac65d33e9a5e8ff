"""Where a data set is split into what trains and what is held out (a test set, a server's public data).

The held-out samples are the data set's last (or first) ones, as they always were, when they hold every class the
data set has (Fashion-MNIST's and digits' classes are interleaved). A data set sorted by class (LFW, retina,
MNI152, an image folder read class by class) would hold out one class only, and score every model on it: it is
split in a fixed shuffled order instead (seed 0: the same for every party that splits it).
"""

from __future__ import annotations

import numpy as np
import torch

SHUFFLE_SEED = 0


def held_out_size(samples: int, most: int) -> int:
    """How many of ``samples`` a run holds out (a test set, a public set) unless told: a fifth, at most ``most``."""
    return min(most, samples // 5)


def split_order(labels: torch.Tensor, size: int, *, at_end: bool = True) -> torch.Tensor | None:
    """The order to take the data set's samples in before holding out ``size`` of them at its end (or, with
    ``at_end=False``, its start): ``None`` (as they are) where those hold every class of ``labels`` (or ``size``
    distinct ones, if fewer), else a fixed shuffle."""
    n = len(labels)
    held = labels[n - size:] if at_end else labels[:size]
    if len(set(held.tolist())) >= min(len(set(labels.tolist())), size):
        return None
    return torch.from_numpy(np.random.default_rng(SHUFFLE_SEED).permutation(n))
