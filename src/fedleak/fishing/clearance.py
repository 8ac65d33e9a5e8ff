"""How far the units of a CNN's lower conv blocks must stay from zero for the attack to prove those blocks.

The attack solves the conv blocks top down (:mod:`fedleak.attacks.exact.conv_walkdown`). A lower block is solved
from the units of its output that are active beyond the error propagated from the block above (the proven 2-norm
error bound of that block's solution), and every unit it uses must be proven active: a unit closer to zero than
that bound breaks the proof. The bound depends on the model and the data, i.e. on how well conditioned the block
above is and how large the features are: 2-9e-4 on the first samples of ``make_convnet``'s benchmark models
(docs/cnn.md) with inputs in [0, 1], 2.5-6.6e-3 on a user's two-conv model with inputs normalised to zero mean
and unit variance. A fixed clearance cannot serve both, so it is read from the attack's own chain on the batch's
first sample, scaled to each sample by the norm of its features (the float32 noise the bound carries grows with
them), times :data:`SAFETY`, and never below the fisher's fixed floor.
"""

from __future__ import annotations

import math

import numpy as np

from fedleak.nets import Network

SAFETY = 2.0  # the clearance over the estimated propagated bound (the bound varies 1.7x across a batch's samples)


def clearances(net: Network, features: np.ndarray, floor: float) -> np.ndarray:
    """``(M, blocks - 1)``: how far each sample's units of each lower conv block (bottom first) must stay from zero,
    for the batch's clean ``features`` (M x feature_dim, float64); ``floor`` where the chain proves nothing."""
    from fedleak.attacks.exact.conv_walkdown import EPS32, invert_chain  # the attack's chain, at the first call
    from fedleak.attacks.exact.options import ExclusivityOptions

    lower = len(net.blocks) - 1
    out = np.full((len(features), max(lower, 0)), floor)
    if lower <= 0 or not len(features):
        return out
    opts = ExclusivityOptions()
    f0 = features[0]
    chain = invert_chain(net, f0, opts.feature_error(f0, EPS32), opts)
    # chain.blocks[j] solves block lower - j (top first); block i's output carries the error of block i + 1's solve
    bounds = np.array([chain.blocks[lower - 1 - i].bound if lower - 1 - i < len(chain.blocks) else math.inf
                       for i in range(lower)])
    norm0 = float(np.linalg.norm(f0))
    if not norm0 > 0:
        return out
    scale = np.linalg.norm(features, axis=1) / norm0
    need = SAFETY * np.where(np.isfinite(bounds), bounds, 0.0)[None, :] * scale[:, None]
    return np.maximum(out, need)
