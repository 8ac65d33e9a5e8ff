"""What an attack returns: a typed, unordered batch of rebuilt samples with per-sample evidence."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(frozen=True)
class SampleRecovery:
    """Evidence for one rebuilt sample.

    ``witnesses`` counts, per hidden layer (input side first), the neurons whose observed gradient
    rows the sample explains on its own; ``solved_layers`` lists layers whose input was instead solved
    from the layer's active outputs. ``residual`` is the worst relative mismatch between the observed
    gradient and the sample's recomputed gradient on those rows; ``scale`` is observed/recomputed
    (``1/M`` for an exact sample of a batch of M).

    ``error_bound`` is what a certificate claims beyond identity: the rebuilt input is within this max abs
    error (data units) of the sample. NaN means the standard claim, exactness to
    :data:`fedleak.metrics.EXACT_TOL` of the data range; the exact attack on CNNs states the proven bound
    of its conv inversion here. :func:`fedleak.metrics.match` holds every certificate to its claim.
    """

    label: int
    certified: bool
    reason: str
    witnesses: tuple[int, ...] = ()
    solved_layers: tuple[int, ...] = ()
    residual: float = float("nan")
    scale: float = float("nan")
    error_bound: float = float("nan")


@dataclass(frozen=True)
class Reconstruction:
    """An attack's output: ``inputs`` (M̂ x model input shape), ``labels`` and ``certified`` (M̂,).

    The batch is unordered; use :func:`fedleak.metrics.match` to pair it with the originals.
    ``batch_size`` and ``label_counts`` are the attacker's estimates for the whole batch (``None`` when
    the attack cannot tell). ``joint_residual`` is how well the certified samples explain the observed
    gradient together with the batch's other samples: the residual beyond the rank those others can fill,
    relative to the layer's gradient, worst layer (NaN when nothing is certified or the attack has no such
    test).
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    certified: torch.Tensor
    attack: str
    samples: tuple[SampleRecovery, ...] = ()
    batch_size: int | None = None
    label_counts: np.ndarray | None = None
    batch_certified: bool = False
    seconds: float = 0.0
    iterations: int | None = None
    joint_residual: float = float("nan")
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def error_bounds(self) -> np.ndarray:
        """Per rebuilt sample, the max abs error its certificate claims (NaN: the standard exactness claim)."""
        if len(self.samples) != len(self):
            return np.full(len(self), np.nan)
        return np.array([s.error_bound for s in self.samples], dtype=np.float64)

    @property
    def num_certified(self) -> int:
        return int(self.certified.sum())

    def summary(self) -> str:
        size = "unknown" if self.batch_size is None else str(self.batch_size)
        return (
            f"{self.attack}: {len(self)} sample(s) rebuilt, {self.num_certified} certified; "
            f"inferred batch size {size}; {self.seconds * 1000:.1f} ms"
        )
