"""The inputs a plan counts on: the user's (a Dataset, a batch tensor, or a pair of inputs and labels), at most
``max_samples`` of them (a seeded random subset beyond), or synthetic ones under a stated assumption."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedleak.errors import DataError
from fedleak.plan.activity import SYNTHETIC_SAMPLES, synthetic_inputs
from fedleak.validation import check_batch, check_labels

MAX_SYNTHETIC = 4096


@dataclass(frozen=True)
class Samples:
    """Inputs (n x ...) and their labels (None: the model's predictions), what they are, and the range their values
    live on (a data set's ``value_range``, a tensor's least and greatest values, synthetic inputs' [0, 1])."""

    x: torch.Tensor
    labels: torch.Tensor | None
    measured: bool
    description: str
    value_range: tuple[float, float] = (0.0, 1.0)


def _subset(n: int, limit: int, seed: int) -> np.ndarray | None:
    return None if n <= limit else np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def user_samples(inputs: object, max_samples: int, seed: int = 0) -> Samples:
    """The user's inputs: a :class:`fedleak.Dataset`, a tensor (labels: the model's predictions) or ``(x, y)``."""
    from fedleak.data import Dataset

    span = None
    if isinstance(inputs, Dataset):
        x, y, what, span = inputs.x, inputs.y, f"{inputs.name} inputs (their labels)", inputs.value_range
    elif isinstance(inputs, (tuple, list)) and len(inputs) == 2:
        x, y = inputs
        check_batch(x, y)
        what = "inputs given (their labels)"
    else:
        x, y = check_batch(inputs), None
        what = "inputs given (labels: the model's predictions)"
    span = span or (float(x.min()), float(x.max()))  # all of them, before any subset
    if y is not None:
        y = torch.from_numpy(check_labels(y, error=DataError))
    total = int(x.shape[0])
    pick = _subset(total, max_samples, seed)
    if pick is not None:
        idx = torch.from_numpy(pick)
        x, y = x[idx], (None if y is None else y[idx])
        what += f", a random {len(pick)} of {total}"
    n = int(x.shape[0])
    return Samples(x, y, True, f"measured on {n} {what}", span)


def synthetic_samples(shape: tuple[int, ...], largest_batch: int, seed: int = 0) -> Samples:
    """Inputs with every value uniform in [0, 1] (enough to draw batches of ``largest_batch``), and the assumption."""
    n = int(min(MAX_SYNTHETIC, max(SYNTHETIC_SAMPLES, 4 * largest_batch)))
    return Samples(synthetic_inputs(shape, n, seed), None, False,
                   f"no inputs given: assumed {n} synthetic inputs with every value uniform in [0, 1] (labels: the "
                   "model's predictions); real data is more alike than noise, so its batches share more neurons: "
                   "pass inputs to measure")
