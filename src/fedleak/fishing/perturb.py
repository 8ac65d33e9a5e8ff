"""What :func:`fedleak.fish` takes and returns: :class:`FishingOptions`, :class:`FishingResult`.

``fedleak.fish`` (:mod:`fedleak.fishing.fisher`) perturbs a batch so that every sample becomes exactly
reconstructable (spec §4): every sample gets ``targets_last`` exclusively activated neurons (ExANs) at
the last ReLU layer of the head and ``targets_other`` at every other one, each with a margin ``kappa``
in pre-activation units, by the smallest perturbation the per-sample LPs find, inside the data range.
This module holds its options, the per-sample records and the data-range rules they share with
exclusivity reduction (:mod:`fedleak.defenses.exclusivity_reduction`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from fedleak.data.normalize import Normalization, check_normalization
from fedleak.errors import FedleakError, SolverError
from fedleak.fishing.lp import LPSettings
from fedleak.fishing.sample_lp import POINT
from fedleak.fishing.solvers import check_solver
from fedleak.image_metrics import sample_psnr
from fedleak.option_fields import options_from, validate_fields
from fedleak.validation import check_data_range

NORMS = tuple(POINT)  # "l2", "l1", "linf": the point each per-sample LP asks for
REGION_FRACTION = 0.01  # units kept on their side of a region stay margin*REGION_FRACTION away from zero
RANGE_ULPS = 4.0  # how far past a data range's ends, in the inputs' epsilons of the range's size, rounding may put them


def resolve_data_range(inputs: torch.Tensor, data_range: Sequence[float] | None, what: str) -> tuple[float, float]:
    """The range the perturbed values must stay in: ``data_range`` when given (the inputs must lie in it, up to
    :data:`RANGE_ULPS` of their dtype's rounding of its ends, which then widens it to hold them: data normalised in
    float32 reaches ``(0 - mean) / std`` rounded, a hair past the exact end), else [0, 1] when the batch lies in it,
    else the batch's own [min, max]."""
    if not inputs.is_floating_point():
        raise FedleakError(f"the inputs are {inputs.dtype}: {what} moves values by fractions of a unit, which that "
                           "dtype cannot hold; pass floating-point inputs (e.g. x.float())")
    lo_x, hi_x = float(inputs.min()), float(inputs.max())
    if data_range is None:
        if lo_x >= 0.0 and hi_x <= 1.0:
            return 0.0, 1.0
        if not lo_x < hi_x:
            raise FedleakError(f"every input value is {lo_x:g}, outside [0, 1]: {what} cannot tell the data range; "
                               "pass data_range=(low, high)")
        return lo_x, hi_x
    lo, hi = (float(v) for v in data_range)
    slack = RANGE_ULPS * float(torch.finfo(inputs.dtype).eps) * max(abs(lo), abs(hi), 1.0)
    if lo_x < lo - slack or hi_x > hi + slack:
        raise FedleakError(f"the inputs (values {lo_x:.9g}..{hi_x:.9g}) leave the data range [{lo:.9g}, {hi:.9g}] "
                           f"that {what} keeps them in; pass the range your data lives in as data_range=(low, high)")
    return min(lo, lo_x), max(hi, hi_x)


@dataclass(frozen=True)
class FishingOptions:
    """Settings of :func:`fedleak.fish` (all keywords of ``fish`` and ``FishingTransform``).

    ``norm``: "linf" (smallest L-infinity radius, then the least-L1 perturbation within
    ``(1 + polish_slack)`` times it) or "l1" (least L1 within ``budget``).
    ``margin``: kappa, the pre-activation margin of every target, as a fraction of the root mean square of the
    batch's pre-activations at the head's last ReLU layer (:attr:`FishingResult.kappa` says what it came to).
    ``budget``: largest L-infinity perturbation allowed, as a fraction of the data range (None: anything
    inside the range); a sample that needs more gets no targets (it stands aside or is sent unperturbed).
    ``min_psnr``: the PSNR floor (dB, against the original, peak = the data range's width): a sample whose
    perturbation would fall below it gets no targets, likewise. With ``norm="l2"`` the LP's point is the least
    squared perturbation that meets the targets, so no smaller one exists for them.
    ``data_range``: ``(low, high)`` the perturbed values stay in (the LP box and the final clamp; PSNR peak
    ``high - low``). None: [0, 1] when the batch lies in it, else the batch's own [min, max] (stated in
    :attr:`FishingResult.data_range`); pass it for data in [-1, 1], 0..255 or normalised space.
    ``normalization``: how the inputs were normalised before the model (a :class:`~fedleak.data.Normalization`, a
    data set's ``.normalization``): their pixels are fished, so each channel keeps to the pixels' range
    (``data_range``, then in pixels, defaults to the normalisation's ``pixel_range``), sizes and PSNR are in pixels,
    and the fished batch is normalised back (a sample left unperturbed is sent as it was).
    ``targets_last`` / ``targets_other``: ExANs to create per sample at the last / every other ReLU layer.
    ``solver``: LP backend (see ``fedleak.fishing.available_solvers()``); ``time_limit`` per LP, seconds.
    ``workers``: processes solving per-sample LPs concurrently (1: in this process; None: one per core).
    ``gamma`` / ``burden``: target pricing (aim at ``gamma*margin``; weight of the push-down the other
    samples need, measured best at 0.3 on Fashion-MNIST, see docs/fishing.md).
    ``repair_rounds``: rounds of repair (retry, stand aside, relief; :meth:`fedleak.fishing.fisher.Fisher.repair`).
    ``solve_check`` (conv blocks only): ``certifiable_before/after`` is the full CNN condition (head ExANs
    and every conv block solvable with a proof, :func:`fedleak.analyze_exclusivity`); False skips the
    block solves (most of the wall time at batch 32) and reports the head condition alone.
    """

    norm: str = "l2"
    margin: float = 0.01
    budget: float | None = None
    min_psnr: float | None = None
    targets_last: int = 2
    targets_other: int = 1
    solver: str = "highs"
    time_limit: float = 10.0
    workers: int | None = None
    polish: bool = True
    polish_slack: float = 0.25
    gamma: float = 2.0
    burden: float = 0.3
    max_rounds: int = 12
    repair_rounds: int = 8
    check_fraction: float = 0.5
    data_range: tuple[float, float] | None = None
    solve_check: bool = True
    normalization: Normalization | None = None

    def __post_init__(self) -> None:
        validate_fields(self, error=SolverError)  # types and signs first, then the checks below
        object.__setattr__(self, "data_range", check_data_range(self.data_range, error=SolverError))
        check_normalization(self.normalization, error=SolverError)
        if self.norm not in NORMS:
            raise SolverError(f"norm must be one of {NORMS}, got '{self.norm}'")
        if not (self.margin > 0 and math.isfinite(self.margin)):
            raise SolverError(f"margin must be a positive number, got {self.margin}")
        if self.budget is not None and not (0 < self.budget <= 1):
            raise SolverError(f"budget must lie in (0, 1] (a fraction of the data range), got {self.budget}")
        if self.min_psnr is not None and not (self.min_psnr > 0 and math.isfinite(self.min_psnr)):
            raise SolverError(f"min_psnr must be a positive number of dB, got {self.min_psnr}")
        if self.targets_last < 1 or self.targets_other < 0:
            raise SolverError("targets_last must be >= 1 and targets_other >= 0")
        if self.time_limit <= 0 or (self.workers is not None and self.workers < 1):
            raise SolverError("time_limit must be positive and workers >= 1 (or None: one per core)")
        if not 0 < self.check_fraction <= 1:
            raise SolverError(f"check_fraction must lie in (0, 1], got {self.check_fraction}")
        check_solver(self.solver)

    @classmethod
    def from_kwargs(cls, **kwargs) -> FishingOptions:
        return options_from(cls, kwargs, error=SolverError, what="fishing option")

    def lp_settings(self, data_range: tuple[float, float] = (0.0, 1.0)) -> LPSettings:
        """The per-sample LP settings for data in ``data_range`` (the budget scaled to data units)."""
        lo, hi = data_range
        budget = None if self.budget is None else self.budget * (hi - lo)
        return LPSettings(norm=self.norm, budget=budget, min_psnr=self.min_psnr, polish=self.polish,
                          polish_slack=self.polish_slack,
                          check_fraction=self.check_fraction, max_rounds=self.max_rounds, solver=self.solver,
                          time_limit=self.time_limit, lo=lo, hi=hi, region_margin=self.margin * REGION_FRACTION)


@dataclass(frozen=True)
class SampleFishing:
    """Per-sample outcome. ``status``: "fished" (LP solved, targets verified in float32), or why the
    sample was left unperturbed ("infeasible", "budget", "time_limit", "no_target", "unsatisfied", ...;
    "saturated": classified with probability 1, the exclusivity attack reads none of its rows)."""

    index: int
    status: str
    perturbed: bool
    certifiable_before: bool
    certifiable_after: bool
    linf: float
    l2: float
    psnr: float
    prediction_changed: bool
    lp_seconds: float
    lp_solves: int
    lp_rows: int
    targets: tuple[tuple[int, ...], ...]
    message: str = ""
    lp_floor_seconds: float = 0.0  # one solve with the rows it ended with: the least LP time this sample could cost

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["targets"] = [list(t) for t in self.targets]
        for key in ("linf", "l2", "psnr"):
            if not math.isfinite(d[key]):
                d[key] = None if math.isnan(d[key]) else ("inf" if d[key] > 0 else "-inf")
        return d


@dataclass(frozen=True)
class FishingResult:
    """The perturbed batch (``inputs``, same shape/dtype as given, on the CPU, inside ``data_range``) and
    per-sample statistics (``psnr`` with peak ``high - low`` of ``data_range``); ``kappa``: the targets' margin in the
    layer's pre-activation units (``options.margin`` times the batch's scale there)."""

    inputs: torch.Tensor
    labels: torch.Tensor
    samples: tuple[SampleFishing, ...]
    options: FishingOptions
    seconds: float
    data_range: tuple[float, float] = (0.0, 1.0)
    kappa: float = float("nan")

    @property
    def batch_size(self) -> int:
        return len(self.samples)

    def _arr(self, name: str) -> np.ndarray:
        return np.array([getattr(s, name) for s in self.samples])

    @property
    def certifiable_before(self) -> np.ndarray:
        return self._arr("certifiable_before").astype(bool)

    @property
    def certifiable_after(self) -> np.ndarray:
        return self._arr("certifiable_after").astype(bool)

    @property
    def fished_fraction(self) -> float:
        """Fraction of samples certifiably reconstructable (ExAN condition in float32) after fishing."""
        return float(self.certifiable_after.mean())

    @property
    def linf(self) -> np.ndarray:
        return self._arr("linf")

    @property
    def psnr(self) -> np.ndarray:
        return self._arr("psnr")

    @property
    def lp_seconds(self) -> float:
        return float(self._arr("lp_seconds").sum())

    @property
    def lp_floor_seconds(self) -> float:
        """One LP per sample with the rows it ended with (what the LPs would cost if every row were known)."""
        return float(self._arr("lp_floor_seconds").sum())

    def summary(self) -> str:
        pert = [s for s in self.samples if s.perturbed]
        linf = np.array([s.linf for s in pert])
        moves = (f"L-inf mean {linf.mean():.4f} / max {linf.max():.4f}; PSNR vs original mean "
                 f"{np.mean([s.psnr for s in pert]):.1f} dB" if pert else "no sample moved")
        failed = [s for s in self.samples if s.status != "fished"]
        moved = sum(s.perturbed for s in failed)
        short = sum(s.status == "fished" and not s.certifiable_after for s in self.samples)
        return (
            f"fishing: {int(self.certifiable_after.sum())}/{self.batch_size} samples meet the exclusivity "
            f"condition (before: {int(self.certifiable_before.sum())}); {moves}; {len(failed)} not fished "
            f"({moved} moved only to stay off the others' targets, {len(failed) - moved} unperturbed)"
            + (f"; {short} fished whose other layers still do not meet it (their messages say why)" if short else "")
            + f"; {self.seconds:.1f} s"
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "batch_size": self.batch_size,
            "certifiable_before": int(self.certifiable_before.sum()),
            "certifiable_after": int(self.certifiable_after.sum()),
            "fished_fraction": self.fished_fraction,
            "seconds": self.seconds,
            "lp_seconds": self.lp_seconds,
            "data_range": list(self.data_range),
            "kappa": self.kappa,
            "options": asdict(self.options),
            "samples": [s.to_dict() for s in self.samples],
        }


def sample_records(fisher, X: np.ndarray, Xp: np.ndarray, out: torch.Tensor, certifiable_before, certifiable_after,
                   pred0: torch.Tensor, pred1: torch.Tensor, peak: float = 1.0) -> tuple[SampleFishing, ...]:
    """Per-sample statistics of a finished fishing run (``fisher``: its outcomes, status, targets)."""
    diff = out.reshape(len(X), -1).to(torch.float64).numpy() - X
    samples = []
    for m in range(len(X)):
        o = fisher.outcomes[m]
        samples.append(
            SampleFishing(
                index=m,
                status=fisher.status[m],
                perturbed=bool(np.abs(diff[m]).max() > 0),
                certifiable_before=bool(certifiable_before[m]),
                certifiable_after=bool(certifiable_after[m]),
                linf=float(np.abs(diff[m]).max()),
                l2=float(np.linalg.norm(diff[m])),
                psnr=sample_psnr(Xp[m], X[m], peak),
                prediction_changed=bool(pred0[m] != pred1[m]),
                lp_seconds=float(o.lp_seconds) if o else 0.0,
                lp_solves=int(o.lp_solves) if o else 0,
                lp_rows=int(o.rows) if o else 0,
                targets=tuple(tuple(int(j) for j in T) for T in fisher.targets[m]),
                message=fisher.messages[m],
                lp_floor_seconds=float(o.final_seconds) if o else 0.0,
            )
        )
    return tuple(samples)
