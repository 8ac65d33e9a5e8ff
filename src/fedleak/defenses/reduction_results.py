"""Exclusivity reduction's settings (:class:`ReductionOptions`) and what it returns: per original sample
(:class:`ReducedSample`) and for the defended batch (:class:`ReductionResult`); the defense itself is
:mod:`fedleak.defenses.exclusivity_reduction`."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from fedleak.data.normalize import Normalization, check_normalization
from fedleak.errors import SolverError
from fedleak.fishing.solvers import check_solver
from fedleak.option_fields import options_from
from fedleak.validation import check_data_range


@dataclass(frozen=True)
class ReductionOptions:
    """Settings of :class:`~fedleak.defenses.exclusivity_reduction.ExclusivityReduction`.

    ``max_exans``: ExANs a sample may keep at each of the first and the last ReLU layer (0: none; 1 already defeats
    the certificate, which needs 2 at the last). ``margin``: kappa of every switched neuron (``z <= -kappa`` off,
    ``z >= kappa`` on), as a fraction of the root mean square of the batch's pre-activations at that layer
    (:attr:`ReductionResult.kappa` says what it came to at the last).
    ``budget``: largest L-infinity perturbation, as a fraction of the data range (None: anything in the
    range). ``rounds``: batch-level rounds (new ExANs a round creates are fixed in the next).
    ``drop_unprotected``: remove samples that stay exclusive from the batch rather than send them.
    ``data_range``: ``(low, high)`` the perturbed values stay in (LP box, final clamp, PSNR peak
    ``high - low``); None: [0, 1] when the batch lies in it, else the batch's own [min, max] (stated in
    :attr:`ReductionResult.data_range`).
    ``normalization``: how the inputs were normalised before the model (a :class:`~fedleak.data.Normalization`):
    their pixels are perturbed, each channel inside the pixels' range (``data_range``, then in pixels, defaults to
    its ``pixel_range``), and normalised back (a sample left unperturbed is sent as it was).
    ``share``: a neuron's gradient row counts as shared only where the other samples' terms in it make up at least
    this fraction of the owner's (a row 99% one sample's is that sample's copy at about 40 dB); a sample whose whole
    loss gradient is below this fraction of the batch's median (a confidently classified one) is dropped with
    ``drop_unprotected``: it adds almost nothing to the update. Larger values leave fewer near copies and drop more.
    """

    max_exans: int = 0
    margin: float = 0.01
    budget: float | None = None
    norm: str = "linf"
    solver: str = "highs"
    time_limit: float = 10.0
    rounds: int = 16
    drop_unprotected: bool = True
    polish: bool = True
    polish_slack: float = 0.25
    data_range: tuple[float, float] | None = None
    share: float = 0.01
    normalization: Normalization | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_range", check_data_range(self.data_range, error=SolverError))
        check_normalization(self.normalization, error=SolverError)
        if not (0 < self.share <= 1):
            raise SolverError(f"share must lie in (0, 1] (a fraction of the term of a row's owner), got {self.share}")
        if self.max_exans < 0:
            raise SolverError(f"max_exans must be >= 0, got {self.max_exans}")
        if not (self.margin > 0 and math.isfinite(self.margin)):
            raise SolverError(f"margin must be a positive number, got {self.margin}")
        if self.budget is not None and not (0 < self.budget <= 1):
            raise SolverError(f"budget must lie in (0, 1] (a fraction of the data range), got {self.budget}")
        if self.norm not in ("linf", "l1"):
            raise SolverError(f"norm must be 'linf' or 'l1', got '{self.norm}'")
        if self.rounds < 1:
            raise SolverError("rounds must be >= 1")
        check_solver(self.solver)

    @classmethod
    def from_kwargs(cls, **kwargs) -> ReductionOptions:
        return options_from(cls, kwargs, error=SolverError, what="exclusivity-reduction option")


@dataclass(frozen=True)
class ReducedSample:
    """Per original sample: ExANs at the first and the last ReLU layer (together) before / after, what was done and
    what it cost."""

    index: int
    status: str  # "clean" (nothing to do), "reduced", "unprotected" (kept with ExANs), "dropped"
    exans_before: int
    exans_after: int
    linf: float
    l2: float
    psnr: float
    lp_seconds: float
    lp_solves: int
    message: str = ""

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        for key in ("linf", "l2", "psnr"):
            if not math.isfinite(d[key]):
                d[key] = None
        return d


@dataclass(frozen=True)
class ReductionResult:
    """The defended batch (``inputs``/``labels`` on the CPU, the kept samples in order, inside
    ``data_range``) and per-sample statistics (``psnr`` with peak ``high - low``); ``kappa``: the margin the moves
    kept, in the layer's pre-activation units (``options.margin`` times the batch's scale there)."""

    inputs: torch.Tensor
    labels: torch.Tensor
    kept: np.ndarray  # indices of the original samples that are in ``inputs``
    samples: tuple[ReducedSample, ...]
    options: ReductionOptions
    seconds: float
    data_range: tuple[float, float] = (0.0, 1.0)
    kappa: float = float("nan")

    @property
    def protected(self) -> bool:
        """True when no kept sample has more than ``max_exans`` ExANs at the first or the last ReLU layer (none is
        ``unprotected``)."""
        return all(s.status != "unprotected" for s in self.samples)

    @property
    def linf(self) -> np.ndarray:
        return np.array([s.linf for s in self.samples if s.status != "dropped"])

    @property
    def psnr(self) -> np.ndarray:
        return np.array([s.psnr for s in self.samples if s.status != "dropped"])

    def summary(self) -> str:
        kept = [s for s in self.samples if s.status != "dropped"]
        before = sum(s.exans_before for s in self.samples)
        after = sum(s.exans_after for s in kept)
        linf = np.array([s.linf for s in kept]) if kept else np.zeros(1)
        return (
            f"exclusivity reduction: ExANs {before} -> {after}; {len(self.samples) - len(kept)} sample(s) "
            f"dropped; L-inf mean {linf.mean():.4f} / max {linf.max():.4f}; "
            f"{'protected' if self.protected else 'NOT protected'}; kappa {self.kappa:.3g} ({self.options.margin:g} of "
            f"the layer's RMS); {self.seconds:.1f} s"
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "batch_size": len(self.samples),
            "kept": self.kept.tolist(),
            "protected": self.protected,
            "seconds": self.seconds,
            "data_range": list(self.data_range),
            "kappa": self.kappa,
            "options": asdict(self.options),
            "samples": [s.to_dict() for s in self.samples],
        }
