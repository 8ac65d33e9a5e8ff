"""kappa, the margin a fished or reduced neuron keeps from zero, in its layer's own units: the user's ``margin``
times the root mean square of the batch's pre-activations at the head's last ReLU layer. Layers sit at very
different scales (at initialisation the built-in CNN's head about five times lower than an MLP's: root mean square
0.054 against 0.27 on Fashion-MNIST; after training, higher), so a margin in absolute units asked a CNN's samples to
move across much of the layer: exclusivity reduction dropped whole batches, and fishing moved a batch of 32 to
32.5 dB where 0.01 of the layer's scale moves it to 69.3 dB."""

from __future__ import annotations

import numpy as np


def kappa_at(Z: np.ndarray, margin: float) -> float:
    """``margin`` times the root mean square of ``Z`` (the batch's pre-activations at the layer); ``margin`` itself
    where the layer is silent on the whole batch (nothing fires: no neuron to move)."""
    scale = float(np.sqrt(np.mean(np.square(Z, dtype=np.float64)))) if Z.size else 0.0
    return margin * scale if scale > 0 else margin
