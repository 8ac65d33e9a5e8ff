"""``fedleak.fish``: perturb a batch so that every sample becomes exactly reconstructable (spec §4).

The curious server's client code calls this on each local batch before the update is computed. Every
sample gets ``targets_last`` exclusively activated neurons (ExANs) at the last ReLU layer and
``targets_other`` at every other ReLU layer, each with a margin ``kappa`` in pre-activation units, by the
smallest perturbation the per-sample LPs find (:mod:`fedleak.fishing.lp`). The perturbed batch is
checked by a float32 forward pass, the precision the client computes in; samples whose LP fails are left
unperturbed (and other samples' targets that such a sample activates are re-chosen).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from torch import nn

from fedleak.analysis.exclusivity import analyze_exclusivity
from fedleak.errors import FedleakError, SolverError
from fedleak.fishing.lp import LPSettings, NetArrays, Requirement, SampleOutcome, solve_sample
from fedleak.fishing.solvers import check_solver
from fedleak.fishing.targets import choose_targets, retarget
from fedleak.models.structure import as_relu_mlp
from fedleak.validation import validate_fields

NORMS = ("linf", "l1")


@contextmanager
def single_threaded_blas():
    """The per-sample work is thousands of small mat-vecs: a multi-threaded BLAS on a shared 2-core
    machine makes each one 50x slower (measured 12 ms vs 0.2 ms for 1024x784), so pin BLAS to one
    thread (parallelism comes from solving samples concurrently instead)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        yield
        return
    with threadpool_limits(1, user_api="blas"):
        yield


@dataclass(frozen=True)
class FishingOptions:
    """Settings of :func:`fish` (all keywords of ``fish`` and ``FishingTransform``).

    ``norm``: "linf" (smallest L-infinity radius, then the least-L1 perturbation within
    ``(1 + polish_slack)`` times it) or "l1" (least L1 within ``budget``).
    ``margin``: kappa, the pre-activation margin of every target (spec §4.3: >= 1e-2).
    ``budget``: largest L-infinity perturbation allowed (None: anything inside [0, 1]); a sample that needs
    more is left unperturbed.
    ``targets_last`` / ``targets_other``: ExANs to create per sample at the last / every other ReLU layer.
    ``solver``: LP backend (see ``fedleak.fishing.available_solvers()``); ``time_limit`` per LP, seconds.
    ``workers``: threads solving per-sample LPs concurrently (1: sequential).
    ``gamma`` / ``burden``: target pricing (aim at ``gamma*margin``; weight of the push-down the other
    samples need, measured best at 0.3 on Fashion-MNIST, see docs/fishing.md).
    ``repair_rounds``: rounds of re-targeting samples whose targets a failed (unperturbed) sample blocks.
    """

    norm: str = "linf"
    margin: float = 0.02
    budget: float | None = None
    targets_last: int = 2
    targets_other: int = 1
    solver: str = "highs"
    time_limit: float = 10.0
    workers: int = 1
    polish: bool = True
    polish_slack: float = 0.25
    gamma: float = 2.0
    burden: float = 0.3
    max_rounds: int = 12
    repair_rounds: int = 3
    check_fraction: float = 0.5

    def __post_init__(self) -> None:
        validate_fields(self, error=SolverError)  # types and signs first, then the checks below
        if self.norm not in NORMS:
            raise SolverError(f"norm must be one of {NORMS}, got '{self.norm}'")
        if not (self.margin > 0 and math.isfinite(self.margin)):
            raise SolverError(f"margin must be a positive number, got {self.margin}")
        if self.budget is not None and not (0 < self.budget <= 1):
            raise SolverError(f"budget must lie in (0, 1] (data range units), got {self.budget}")
        if self.targets_last < 1 or self.targets_other < 0:
            raise SolverError("targets_last must be >= 1 and targets_other >= 0")
        if self.time_limit <= 0 or self.workers < 1:
            raise SolverError("time_limit must be positive and workers >= 1")
        if not 0 < self.check_fraction <= 1:
            raise SolverError(f"check_fraction must lie in (0, 1], got {self.check_fraction}")
        check_solver(self.solver)

    @classmethod
    def from_kwargs(cls, **kwargs) -> FishingOptions:
        known = {f.name for f in fields(cls)}
        unknown = set(kwargs) - known
        if unknown:
            raise SolverError(f"unknown fishing option(s): {sorted(unknown)}; known: {sorted(known)}")
        return cls(**kwargs)

    def lp_settings(self) -> LPSettings:
        return LPSettings(norm=self.norm, budget=self.budget, polish=self.polish, polish_slack=self.polish_slack,
                          check_fraction=self.check_fraction, max_rounds=self.max_rounds, solver=self.solver,
                          time_limit=self.time_limit)


@dataclass(frozen=True)
class SampleFishing:
    """Per-sample outcome. ``status``: "fished" (LP solved, targets verified in float32), or why the
    sample was left unperturbed ("infeasible", "budget", "time_limit", "no_target", "unsatisfied", ...)."""

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

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["targets"] = [list(t) for t in self.targets]
        for key in ("linf", "l2", "psnr"):
            if not math.isfinite(d[key]):
                d[key] = None if math.isnan(d[key]) else ("inf" if d[key] > 0 else "-inf")
        return d


@dataclass(frozen=True)
class FishingResult:
    """The perturbed batch (``inputs``, same shape/dtype as given, in [0, 1]) and per-sample statistics."""

    inputs: torch.Tensor
    labels: torch.Tensor
    samples: tuple[SampleFishing, ...]
    options: FishingOptions
    seconds: float

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

    def summary(self) -> str:
        pert = [s for s in self.samples if s.perturbed]
        linf = np.array([s.linf for s in pert]) if pert else np.zeros(1)
        ps = np.array([s.psnr for s in pert]) if pert else np.full(1, np.nan)
        failed = [s for s in self.samples if s.status != "fished"]
        return (
            f"fishing: {int(self.certifiable_after.sum())}/{self.batch_size} samples meet the exclusivity "
            f"condition (before: {int(self.certifiable_before.sum())}); L-inf mean {linf.mean():.4f} / max "
            f"{linf.max():.4f}; PSNR vs original mean {np.nanmean(ps):.1f} dB; {len(failed)} left unperturbed "
            f"or unmet; {self.seconds:.1f} s"
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "batch_size": self.batch_size,
            "certifiable_before": int(self.certifiable_before.sum()),
            "certifiable_after": int(self.certifiable_after.sum()),
            "fished_fraction": self.fished_fraction,
            "seconds": self.seconds,
            "lp_seconds": self.lp_seconds,
            "options": asdict(self.options),
            "samples": [s.to_dict() for s in self.samples],
        }


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return 100.0 if mse <= 1e-10 else min(100.0, 10 * math.log10(1.0 / mse))


class _Fisher:
    def __init__(self, net, arrays: NetArrays, X: np.ndarray, y: np.ndarray, opts: FishingOptions):
        self.net, self.A, self.X, self.y, self.o = net, arrays, X, y, opts
        self.M = X.shape[0]
        self.k = [opts.targets_other] * (arrays.depth - 1) + [opts.targets_last]
        self.settings = opts.lp_settings()
        self.Xp = X.copy()
        self.fixed = np.zeros(self.M, dtype=bool)
        self.outcomes: list[SampleOutcome | None] = [None] * self.M
        self.targets: list[list[np.ndarray]] = []  # per sample, per layer
        self.patterns: list[list[np.ndarray]] = []
        self.status = ["pending"] * self.M
        self.messages = [""] * self.M

    # --- requirements of one sample given everyone's targets ---------------------------------------------
    def requirements(self, m: int) -> tuple[list[Requirement], list[Requirement]]:
        kap = self.o.margin
        own = [Requirement(h, int(j), +1, kap) for h, T in enumerate(self.targets[m]) for j in T if j >= 0]
        lazy = [
            Requirement(h, int(j), -1, kap)
            for n in range(self.M) if n != m and not self.fixed[n]
            for h, T in enumerate(self.targets[n]) for j in T if j >= 0
        ]
        return own, lazy

    def solve(self, m: int) -> SampleOutcome:
        if any((T < 0).any() for T in self.targets[m]):
            return SampleOutcome("no_target", self.X[m].copy(), message="no neuron left that this sample could own")
        own, lazy = self.requirements(m)
        try:
            return solve_sample(self.A, self.X[m], self.patterns[m], own, lazy, self.settings)
        except Exception as exc:  # a solver crash must not take the batch down; the sample stays clean
            return SampleOutcome(f"error:{type(exc).__name__}", self.X[m].copy(), message=str(exc))

    def solve_many(self, ms: list[int]) -> None:
        if self.o.workers > 1 and len(ms) > 1:
            with ThreadPoolExecutor(self.o.workers) as pool:
                results = list(pool.map(self.solve, ms))
        else:
            results = [self.solve(m) for m in ms]
        for m, out in zip(ms, results):
            prev = self.outcomes[m]
            if prev is not None:  # accumulate LP effort over repairs
                out.lp_solves += prev.lp_solves
                out.lp_seconds += prev.lp_seconds
            self.outcomes[m] = out
            self.Xp[m] = out.x
            self.status[m] = "fished" if out.ok else out.status
            self.messages[m] = out.message

    def others_state(self, m: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The other samples' current pre-activations and, per layer, the neurons they already target."""
        others = [n for n in range(self.M) if n != m]
        zs = self.A.preacts(self.Xp[others]) if others else [np.zeros((0, w)) for w in self.A.widths]
        used = []
        for h, w in enumerate(self.A.widths):
            u = np.zeros(w, dtype=bool)
            for n in others:
                if not self.fixed[n]:
                    t = self.targets[n][h]
                    u[t[t >= 0]] = True
            used.append(u)
        return zs, used

    def retarget(self, m: int, banned: list[set[int]] | None = None) -> None:
        zs, used = self.others_state(m)
        T, P = retarget(self.A, self.X[m], int(self.y[m]), zs, used, self.k, self.o.margin, gamma=self.o.gamma,
                        banned=banned)
        self.targets[m] = T
        self.patterns[m] = P

    def freeze(self, m: int) -> None:
        self.fixed[m] = True
        self.Xp[m] = self.X[m]

    def blocked(self) -> list[int]:
        """Working samples one of whose targets another sample (in float32) activates."""
        Z = self.A.preacts(self.Xp.astype(np.float32), f32=True)
        bad = []
        cf = self.o.check_fraction * self.o.margin
        for m in range(self.M):
            if self.fixed[m] or self.status[m] != "fished":
                continue
            for h, T in enumerate(self.targets[m]):
                col = Z[h][:, T[T >= 0]]
                others = np.delete(col, m, axis=0)
                if (col[m] < cf).any() or (others.size and (others > -cf).any()):
                    bad.append(m)
                    break
        return bad

    def run(self) -> None:
        asg = choose_targets(self.A, self.X, self.y, self.k, self.o.margin, gamma=self.o.gamma, burden=self.o.burden)
        self._run_from(asg)

    def _run_from(self, asg) -> None:
        """Solve every sample's LP for the target assignment ``asg``, then repair the failures."""
        self.targets = [[T[m] for T in asg.targets] for m in range(self.M)]
        self.patterns = [[P[m] for P in asg.patterns] for m in range(self.M)]
        self.solve_many(list(range(self.M)))
        for _ in range(self.o.repair_rounds):
            failed = [m for m in range(self.M) if self.status[m] != "fished" and not self.fixed[m]]
            for m in failed:
                self.freeze(m)
            retry = []
            # a failed sample gets one more try with fresh targets chosen against the others as they are
            for m in failed:
                if self.outcomes[m] is not None and self.outcomes[m].extra.get("retried"):
                    continue
                banned = [set(int(j) for j in T if j >= 0) for T in self.targets[m]]
                self.fixed[m] = False
                self.retarget(m, banned)
                self.outcomes[m].extra["retried"] = True
                retry.append(m)
            blocked = self.blocked()
            for m in blocked:
                self.retarget(m)
            todo = sorted(set(retry) | set(blocked))
            if not todo:
                break
            self.solve_many(todo)
            for m in todo:
                self.outcomes[m].extra["retried"] = True
        for m in range(self.M):
            if self.status[m] != "fished":
                self.freeze(m)


def fish(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor | None = None, **options) -> FishingResult:
    """Perturb ``inputs`` (a batch, M x ...) so that every sample can be rebuilt exactly from the update.

    Options are the fields of :class:`FishingOptions`. ``labels`` default to the model's predictions
    (they decide which neurons carry a backward signal). Returns a :class:`FishingResult` whose ``inputs``
    is the perturbed batch (same shape and dtype, values in [0, 1]); samples whose LP failed are
    unchanged and say why. Works for any depth, with or without biases.
    """
    from fedleak.models.convnet import is_cnn

    if is_cnn(model):  # CNNs: fish the FC head through the conv stack (fedleak.fishing.conv)
        from fedleak.fishing.conv import fish_cnn

        return fish_cnn(model, inputs, labels, **options)
    start = time.perf_counter()
    opts = options.pop("options", None) or FishingOptions.from_kwargs(**options)
    if not isinstance(inputs, torch.Tensor) or inputs.ndim < 2 or inputs.shape[0] == 0:
        raise FedleakError("inputs must be a non-empty batch tensor (M x ...)")
    net = as_relu_mlp(model)
    if net.depth == 0:
        raise FedleakError("fishing needs at least one hidden ReLU layer")
    if inputs[0].numel() != net.input_dim:
        raise FedleakError(f"each input has {inputs[0].numel()} values but the model takes {net.input_dim}")
    if not torch.isfinite(inputs).all():
        raise FedleakError("the inputs hold NaN or inf values")
    if float(inputs.min()) < 0 or float(inputs.max()) > 1:
        raise FedleakError("fishing works on data in [0, 1]; the inputs leave that range")
    dtype = net.dense[0].module.weight.dtype
    with torch.no_grad():
        if labels is None:
            labels = model(inputs.to(dtype)).argmax(1)
        labels = torch.as_tensor(labels).long().reshape(-1)
    if labels.shape[0] != inputs.shape[0]:
        raise FedleakError(f"{inputs.shape[0]} inputs but {labels.shape[0]} labels")
    before = analyze_exclusivity(model, inputs.to(dtype), labels,
                                 min_last=opts.targets_last, min_other=min(1, opts.targets_other))
    X = inputs.detach().reshape(inputs.shape[0], -1).to(torch.float64).numpy().copy()
    arrays = NetArrays(net)
    fisher = _Fisher(net, arrays, X, labels.numpy(), opts)
    with single_threaded_blas():
        fisher.run()
    Xp = np.clip(fisher.Xp, 0.0, 1.0)
    out = torch.from_numpy(Xp).to(inputs.dtype).reshape(inputs.shape).clamp(0, 1)
    after = analyze_exclusivity(model, out.to(dtype), labels,
                                min_last=opts.targets_last, min_other=min(1, opts.targets_other))
    with torch.no_grad():
        pred0 = model(inputs.to(dtype)).argmax(1)
        pred1 = model(out.to(dtype)).argmax(1)
    samples = sample_records(fisher, X, Xp, out, before.certifiable, after.certifiable, pred0, pred1)
    return FishingResult(out, labels, samples, opts, time.perf_counter() - start)


def sample_records(fisher, X: np.ndarray, Xp: np.ndarray, out: torch.Tensor, certifiable_before, certifiable_after,
                   pred0: torch.Tensor, pred1: torch.Tensor) -> tuple[SampleFishing, ...]:
    """Per-sample statistics of a finished fishing run (shared by the MLP and CNN fishers)."""
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
                psnr=_psnr(Xp[m], X[m]),
                prediction_changed=bool(pred0[m] != pred1[m]),
                lp_seconds=float(o.lp_seconds) if o else 0.0,
                lp_solves=int(o.lp_solves) if o else 0,
                lp_rows=int(o.rows) if o else 0,
                targets=tuple(tuple(int(j) for j in T) for T in fisher.targets[m]),
                message=fisher.messages[m],
            )
        )
    return tuple(samples)
