"""What an attack returns: a typed, unordered batch of rebuilt samples with per-sample evidence."""

from __future__ import annotations

import dataclasses
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
    (``1/M`` for an exact sample of a batch of M). A candidate the exact attack settled before its
    certificate (a blend of samples, by its scale; the ``reason`` says so) has the rows and the scale its
    last ReLU layer's check read (the fit of their output-layer columns), and no residual.

    ``error_bound`` is what a certificate claims beyond identity: the rebuilt input is within this max abs
    error (data units) of the sample. NaN means the standard claim, exactness to
    :data:`fedleak.metrics.EXACT_TOL` of the data range; the exact attack on CNNs states the proven bound
    of its conv inversion here. :func:`fedleak.metrics.match` holds every certificate to its claim.

    ``route`` names what produced the sample: ``"exclusivity (certified)"`` / ``"exclusivity (uncertified)"``
    for the exact route, the optimisation attack's name (``"dlm+"``, ``"ig"``, ...) for a searched sample
    (empty when the attack does not say). ``rebuilt`` is False when the attack found the sample (its label and
    ``reason``) but could not rebuild its input: its row of ``Reconstruction.inputs`` holds zeros.
    """

    label: int
    certified: bool
    reason: str
    witnesses: tuple[int, ...] = ()
    solved_layers: tuple[int, ...] = ()
    residual: float = float("nan")
    scale: float = float("nan")
    error_bound: float = float("nan")
    route: str = ""
    rebuilt: bool = True


@dataclass(frozen=True)
class Reconstruction:
    """An attack's output: ``inputs`` (M̂ x model input shape), ``labels`` and ``certified`` (M̂,).

    The batch is unordered; use :func:`fedleak.metrics.match` to pair it with the originals.
    ``batch_size`` and ``label_counts`` are the attacker's estimates for the whole batch (``None`` when
    the attack cannot tell). ``joint_residual`` is how well the certified samples explain the observed
    gradient together with the batch's other samples: the residual beyond the rank those others can fill,
    relative to the layer's gradient, worst layer (NaN when nothing is certified or the attack has no such
    test). ``missing_reason`` says why fewer samples than the batch holds were rebuilt (empty when the attack
    does not say).
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
    missing_reason: str = ""

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    @property
    def error_bounds(self) -> np.ndarray:
        """Per rebuilt sample, the max abs error its certificate claims (NaN: the standard exactness claim)."""
        if len(self.samples) != len(self):
            return np.full(len(self), np.nan)
        return np.array([s.error_bound for s in self.samples], dtype=np.float64)

    @property
    def routes(self) -> tuple[str, ...]:
        """Per rebuilt sample, the route that produced it (``SampleRecovery.route``; empty where unknown)."""
        if len(self.samples) != len(self):
            return ("",) * len(self)
        return tuple(s.route for s in self.samples)

    @property
    def num_certified(self) -> int:
        return int(self.certified.sum())

    def withdraw(self, reason: str) -> Reconstruction:
        """This result with every certificate withdrawn, each sample's reason and a note saying ``reason`` (the
        samples stay: they may still be exact, nothing proves it)."""
        if self.num_certified == 0 and not self.batch_certified:
            return dataclasses.replace(self, notes=(*self.notes, reason))
        samples = tuple(dataclasses.replace(s, certified=False, reason=f"{reason} ({s.reason})" if s.reason else reason)
                        for s in self.samples)
        return dataclasses.replace(self, certified=torch.zeros(len(self), dtype=torch.bool), samples=samples,
                                   batch_certified=False, joint_residual=float("nan"), notes=(*self.notes, reason))

    def without_samples(self, reason: str) -> Reconstruction:
        """This result with none of its samples (none is one of the batch's inputs: what the attack read mixes
        them), ``reason`` saying why (the reason for the missing samples, and a note)."""
        return dataclasses.replace(self, inputs=self.inputs[:0], labels=self.labels[:0], certified=self.certified[:0],
                                   samples=(), batch_certified=False, joint_residual=float("nan"),
                                   notes=(*self.notes, reason), missing_reason=reason)

    def why_uncertified(self) -> str:
        """Why nothing (more) is certified, in words: the first uncertified sample's reason, else why samples
        are missing; empty when every sample of the batch is rebuilt and certified."""
        for s in self.samples:
            if not s.certified and s.reason:
                return s.reason
        if self.missing_reason:
            return self.missing_reason
        if len(self) == 0:
            return self.notes[-1] if self.notes else "the attack gave no reason"
        return ""

    def summary(self) -> str:
        size = "unknown" if self.batch_size is None else str(self.batch_size)
        took = f"{self.seconds * 1000:.1f} ms" if self.seconds < 10 else f"{self.seconds:.1f} s"
        text = (f"{self.attack}: {len(self)} sample(s) rebuilt, {self.num_certified} certified; "
                f"inferred batch size {size}; {took}")
        routes = [r for r in self.routes if r]
        if routes and len(set(routes)) > 1:
            counts = {r: routes.count(r) for r in dict.fromkeys(routes)}
            text += "; routes: " + ", ".join(f"{n} {r}" for r, n in counts.items())
        short = len(self) == 0 or self.num_certified == 0 or (
            self.batch_size is not None and len(self) < self.batch_size)
        why = self.why_uncertified() if short else ""
        return text + (f" (why: {why})" if why else "")
