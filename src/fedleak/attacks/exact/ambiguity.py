"""Certified samples that another rebuilt input of their label nearly repeats.

A sample the model classifies with near certainty adds almost nothing to the gradient. On the rows it shares with
another sample, it moves the ratio of weight row to bias by its tiny share, and those rows agree on that blend as
a sample's rows agree on the sample. So the sample (from its own rows) and the blend (from the shared ones) can
both be rebuilt, at scales within noise of the batch's, and the update cannot tell which one is the sample to
better than their distance. A certified input that another rebuilt input of its label, with a verified witness row
at the last ReLU layer and at the batch's scale (:data:`AT_SCALE`), lies closer to than :data:`NEAR` of the data
range, but farther than the exactness tolerance, loses its certificate. (Measured: LFW
crops at raw 0-255 pixels, a default-init 625-1024-2 model, a batch of 5 whose label-0 samples the model gives
probability 1 - 1.5e-6 to 1: a blend 1.2e-4 of the range from its sample, at 1 + 9.5e-5 times the batch's scale
with two witness rows, was certified, and the sample itself, 15 witness rows at 1 + 1.7e-5, was not.)
"""

from __future__ import annotations

import torch

NEAR = 1e-2  # another input of the label closer than this (of the data range) makes a certified input ambiguous
AT_SCALE = 1e-3  # the candidates compared: those whose scale is within this (relative) of the batch's


def ambiguous(inputs: torch.Tensor, labels: list[int], certified: list[int], near_scale: list[int],
              exact_tol: float, width: float, spread: list[float] | None = None) -> dict[int, str]:
    """Which of the ``certified`` candidates another candidate of ``near_scale`` (rebuilt inputs ``inputs``, one
    flattened row each, and ``labels``, by index) with its label lies within ``NEAR * width`` of (max abs) but not
    within ``exact_tol * width`` plus both inputs' ``spread`` (how far the update's own rounding can move each:
    a weight delta's; none for a gradient), with the reason for each."""
    if not certified or len(near_scale) < 2:
        return {}
    spread = spread or [0.0] * len(inputs)
    gaps = torch.cdist(inputs[certified], inputs[near_scale], p=float("inf")).tolist()
    out: dict[int, str] = {}
    for k, row in zip(certified, gaps):
        close = [(d, j) for d, j in zip(row, near_scale) if j != k and labels[j] == labels[k]
                 and exact_tol * width + spread[k] + spread[j] < d <= NEAR * width]
        if close:
            d = min(close)[0]
            out[k] = (f"another rebuilt input of its label lies {d / width:.1e} of the data range from it, more than "
                      f"the exactness tolerance ({exact_tol:g}) and less than {NEAR:g}: the update cannot tell which "
                      "one is the sample to the tolerance (a blend with a sample the model classifies with near "
                      "certainty, whose share of their rows is below the noise)")
    return out
