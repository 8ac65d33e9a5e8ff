"""Whether the attack proves a network's conv blocks, tried on a few inputs (:func:`fedleak.analyze_exclusivity`).

Enough equations are necessary, not sufficient: the attack also needs a proven lower bound on each block's
smallest singular value, and the error bound of a block constrains the active set it may use below it (docs/cnn.md,
"error amplification"). So where every block has enough equations, the plan runs the analysis's own solvability
check -- the attack's block solver on the inputs' true activations -- on a few inputs. It is skipped when its
band factorisations would cost more than :data:`PROOF_BUDGET` flops per input, unless asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedleak.nets import Network
from fedleak.plan.conv import BlockShape

PROOF_SAMPLES = 4
PROOF_BUDGET = 2e9  # flops per input of the band factorisations, estimated


@dataclass(frozen=True)
class ProofCheck:
    """The attack's proof tried on ``samples`` inputs (0: not tried, ``note`` says why): per block, the inputs it
    proved (``proven``), and the inputs whose chained error bound is within what a certificate allows
    (``chained``)."""

    samples: int
    proven: tuple[int, ...]
    chained: int
    note: str = ""

    @property
    def ran(self) -> bool:
        return self.samples > 0


def proof_flops(shapes: list[BlockShape]) -> float:
    """Estimated flops per input of the blocks' band Cholesky factorisations (half-bandwidth about
    ``(kh - 1) W C`` in pixel-major order; docs/cnn.md)."""
    total = 0.0
    for s in shapes:
        c, _, w = s.in_shape
        band = (s.kernel[0] - 1) * w * c + c * s.kernel[1]
        total += 2.0 * s.unknowns * (band + 1) ** 2  # factorisation, and as much again for the bound's factorisation
    return total


def check_proofs(net: Network, x: torch.Tensor, labels: torch.Tensor | None, shapes: list[BlockShape],
                 samples: int | None) -> ProofCheck:
    """Run the proof on ``samples`` inputs (None: :data:`PROOF_SAMPLES` when cheap enough; 0: never)."""
    from fedleak.analysis import analyze_exclusivity

    flops = proof_flops(shapes)
    if samples == 0:
        return ProofCheck(0, (), 0, "not asked for")
    if samples is None and flops > PROOF_BUDGET:
        return ProofCheck(0, (), 0, f"not run: about {flops / 1e9:.0f} GFLOP per input (ask for it to run it)")
    k = min(PROOF_SAMPLES if samples is None else samples, len(x))
    report = analyze_exclusivity(net, x[:k], None if labels is None else labels[:k])
    proven = tuple(int(np.asarray(c.solvable).sum()) for c in report.conv_layers)
    bound = np.asarray(report.error_bound)
    chained = int((bound <= (report.allowed_error if report.allowed_error is not None else np.inf)).sum())
    return ProofCheck(k, proven, chained)
