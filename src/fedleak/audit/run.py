"""Run a leakage audit: for each batch size and scenario, draw batches, compute the client's update,
attack it, and score what came back against the truth.

A *scenario* is a client-side :class:`~fedleak.transforms.BatchTransform` with a name: ``plain`` (an
honest client), and, when the modules are available, ``fished`` (the server's fishing hook) and
``defended`` (exclusivity reduction). The attack sees only the update.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from fedleak.analysis import analyze_exclusivity
from fedleak.api import reconstruct
from fedleak.data import Dataset, load_dataset
from fedleak.errors import FedleakError
from fedleak.metrics import MatchResult, match, psnr
from fedleak.models import make_mlp
from fedleak.registry import Registry
from fedleak.report.samples import sample_reasons
from fedleak.transforms import BatchTransform, Identity
from fedleak.updates import compute_gradient_update
from fedleak.validation import validate_fields


@dataclass(frozen=True)
class AuditSettings:
    """What an audit runs. ``data`` is a built-in data set name or a path to the user's data."""

    data: str = "digits"
    widths: tuple[int, ...] = (1024,)
    bias: bool = True
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    trials: int = 1
    seed: int = 0
    attack: str = "exclusivity"
    scenarios: tuple[str, ...] = ("plain",)
    split: str | None = None
    model: str | None = None  # a model spec (fedleak.models.zoo.load_model); replaces widths/bias/conv
    weights: str | None = None  # the model's state dict, for a built-in or a class
    budget: float = 20.0  # seconds per batch for attack="auto"
    conv: tuple[int, ...] = ()  # conv channels: audit a CNN (conv blocks, then an FC head of `widths`)

    def __post_init__(self) -> None:
        validate_fields(self)  # types and signs first, then the checks below
        if not self.batch_sizes or any(int(b) <= 0 for b in self.batch_sizes):
            raise FedleakError(f"batch sizes must be positive integers, got {list(self.batch_sizes)}")
        if not self.widths or any(int(w) <= 0 for w in self.widths):
            raise FedleakError(f"model widths must be positive integers, got {list(self.widths)}")
        if self.trials <= 0:
            raise FedleakError(f"trials must be positive, got {self.trials}")
        if not self.budget > 0:
            raise FedleakError(f"budget must be positive seconds, got {self.budget}")
        if not self.scenarios:
            raise FedleakError("at least one scenario is needed")

    def to_dict(self) -> dict[str, object]:
        return {
            "data": self.data, "widths": list(self.widths), "bias": self.bias, "batch_sizes": list(self.batch_sizes),
            "trials": self.trials, "seed": self.seed, "attack": self.attack, "scenarios": list(self.scenarios),
            "split": self.split, "model": self.model, "weights": self.weights, "budget": self.budget,
            "conv": list(self.conv),
        }


@dataclass(frozen=True)
class BatchResult:
    """One attacked batch: exclusivity, what the attack found, and how it scored."""

    scenario: str
    batch_size: int
    trial: int
    certifiable: int
    exan_counts: list[list[int]]  # per layer, per sample
    rebuilt: int
    certified: int
    recovered: int
    exact: int
    false_certificates: int  # every certified sample that is not a distinct sample of the batch (metrics.match)
    inferred_batch_size: int | None
    batch_certified: bool
    label_accuracy: float
    mean_psnr: float
    mean_ssim: float
    gradient_seconds: float
    transform_seconds: float
    attack_seconds: float
    # per sent sample: MatchResult.per_original() scores, "original" (its index in the drawn batch), "status"
    # ("certified", "false", "uncertified", "missing": not rebuilt) and "reason" (why, in words)
    per_sample: dict[str, list]
    psnr_vs_original: float | None = None
    perturbation_linf: float | None = None  # mean over samples of max |x' - x| (same-shape transforms)
    perturbation_psnr: float | None = None  # mean PSNR of what the client sent vs the original batch
    sent: int | None = None  # samples the client's update covers (a defense may drop some)
    # per certified sample: index, nearest original, its max abs error, credited original, false, reason
    certificates: dict[str, list] = field(default_factory=dict)
    # the batch's samples the client left out of its update: "index" (in the drawn batch) and "reason"
    withheld: dict[str, list] = field(default_factory=dict)

    @property
    def recovered_fraction(self) -> float:
        return self.recovered / self.batch_size

    def to_dict(self) -> dict[str, object]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["recovered_fraction"] = self.recovered_fraction
        return d


@dataclass(frozen=True)
class Showcase:
    """Images for the report, one column per sample of the drawn batch: originals, what the client sent
    (after its transform; NaN where it withheld the sample) and the rebuilt samples matched to them (NaN
    where nothing matched), unclamped; then one extra column per certified sample that no original was
    paired with (a false certificate beyond the batch; NaN original). ``status`` per column: "certified"
    (sound), "false" (a false certificate), "uncertified", "missing" (nothing rebuilt) or "withheld" (not in
    the update); ``reasons`` says why for every column that is not "certified". ``labels`` is -1 in extra
    columns. ``value_range`` is the data's (lo, hi), for display."""

    scenario: str
    batch_size: int
    originals: np.ndarray
    sent: np.ndarray
    rebuilt: np.ndarray
    certified: np.ndarray
    labels: np.ndarray
    rebuilt_labels: np.ndarray
    status: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()
    value_range: tuple[float, float] = (0.0, 1.0)


@dataclass(frozen=True)
class AuditResult:
    settings: AuditSettings
    dataset: str
    input_shape: tuple[int, ...]
    num_classes: int
    batches: tuple[BatchResult, ...]
    showcases: tuple[Showcase, ...]
    seconds: float
    notes: tuple[str, ...] = field(default_factory=tuple)
    value_range: tuple[float, float] = (0.0, 1.0)  # the data's (lo, hi): tolerances and PSNR are on it

    def summary_rows(self) -> list[dict[str, object]]:
        """Per scenario and batch size: means over trials."""
        rows = []
        keys = sorted({(b.scenario, b.batch_size) for b in self.batches},
                      key=lambda k: (self.settings.scenarios.index(k[0]) if k[0] in self.settings.scenarios else 99, k[1]))
        for scenario, size in keys:
            group = [b for b in self.batches if b.scenario == scenario and b.batch_size == size]
            n = sum(b.batch_size for b in group)
            rows.append({
                "scenario": scenario,
                "batch_size": size,
                "trials": len(group),
                "certifiable_fraction": sum(b.certifiable for b in group) / n,
                "recovered_fraction": sum(b.recovered for b in group) / n,
                "exact_fraction": sum(b.exact for b in group) / n,
                "certified": sum(b.certified for b in group),
                "false_certificates": sum(b.false_certificates for b in group),
                "label_accuracy": _nanmean([b.label_accuracy for b in group]),
                "mean_psnr": _nanmean([b.mean_psnr for b in group]),
                "psnr_vs_original": _nanmean([b.psnr_vs_original for b in group if b.psnr_vs_original is not None]),
                "gradient_ms": 1000 * float(np.mean([b.gradient_seconds for b in group])),
                "attack_ms": 1000 * float(np.mean([b.attack_seconds for b in group])),
                "transform_ms": 1000 * float(np.mean([b.transform_seconds for b in group])),
                "perturbation_linf": _nanmean([b.perturbation_linf for b in group if b.perturbation_linf is not None]),
                "perturbation_psnr": _nanmean([b.perturbation_psnr for b in group if b.perturbation_psnr is not None]),
            })
        return rows


    def reconstructable_batch_size(self, threshold: float = 0.99) -> dict[str, int | None]:
        """Per scenario, the largest audited batch size up to which at least ``threshold`` of every batch
        was recovered (certified and exact); None if not even the smallest was."""
        out: dict[str, int | None] = {}
        for scenario in self.settings.scenarios:
            best = None
            for row in (r for r in self.summary_rows() if r["scenario"] == scenario):
                if row["recovered_fraction"] < threshold:
                    break
                best = row["batch_size"]
            out[scenario] = best
        return out


def _nanmean(values: Sequence[float]) -> float | None:
    vals = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(vals)) if vals else None


# ---------------------------------------------------------------------------------------------------------
# Scenarios: named client-side transforms


ScenarioFactory = Callable[[AuditSettings, Dataset], BatchTransform]
_SCENARIOS: Registry[tuple[ScenarioFactory, str]] = Registry("scenario")


def register_scenario(name: str, description: str) -> Callable[[ScenarioFactory], ScenarioFactory]:
    """Decorator that makes ``factory(settings, data) -> BatchTransform`` the audit scenario ``name``."""
    return _SCENARIOS.decorator(name, lambda factory: (factory, description))


def available_scenarios() -> dict[str, str]:
    return {name: desc for name, (_, desc) in _SCENARIOS.items()}


@register_scenario("plain", "an honest client: the batch as it is")
def _plain(settings: AuditSettings, data: Dataset) -> BatchTransform:
    return Identity()


@register_scenario("fished", "the curious server's client code fishes each batch (LP perturbation)")
def _fished(settings: AuditSettings, data: Dataset) -> BatchTransform:
    from fedleak.fishing import FishingTransform

    return FishingTransform(data_range=data.value_range, workers=None)  # valid data; LPs on all cores


@register_scenario("defended", "the client reduces exclusivity before computing its update")
def _defended(settings: AuditSettings, data: Dataset) -> BatchTransform:
    from fedleak.defenses import ExclusivityReduction

    return ExclusivityReduction(data_range=data.value_range)


def _scenario(name: str, settings: AuditSettings, data: Dataset) -> BatchTransform:
    factory, _ = _SCENARIOS.get(name)
    return factory(settings, data)


# ---------------------------------------------------------------------------------------------------------


def _withheld(scenario: str, size: int, trial: int, transform_seconds: float, net: nn.Module) -> BatchResult:
    depth = sum(isinstance(m, nn.ReLU) for m in net.modules())
    return BatchResult(
        scenario=scenario, batch_size=size, trial=trial, certifiable=0, exan_counts=[[] for _ in range(depth)],
        rebuilt=0, certified=0, recovered=0, exact=0, false_certificates=0, inferred_batch_size=None,
        batch_certified=False, label_accuracy=float("nan"), mean_psnr=float("nan"), mean_ssim=float("nan"),
        gradient_seconds=0.0, transform_seconds=transform_seconds, attack_seconds=0.0, per_sample={}, sent=0,
        withheld={"index": list(range(size)), "reason": [_withheld_reason(scenario)] * size},
    )


def _withheld_reason(scenario: str) -> str:
    return f"left out of the update by the client ({scenario}): nothing of it can leak, and it trains nothing"


def _kept(x: torch.Tensor, xs: torch.Tensor) -> np.ndarray:
    """Which samples of the drawn batch ``x`` the client's batch ``xs`` holds, in its order: all of them when the
    sizes agree, else each sent sample's nearest original (a transform only perturbs what it keeps)."""
    if xs.shape[0] == x.shape[0]:
        return np.arange(x.shape[0])
    if xs.shape[0] > x.shape[0]:
        raise FedleakError(f"the client's transform returned {xs.shape[0]} samples for a batch of {x.shape[0]}; "
                           "a transform may perturb or leave out samples, not add them")
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(xs.reshape(len(xs), -1).double(), x.reshape(len(x), -1).double()).numpy()
    rows, cols = linear_sum_assignment(cost)
    return cols[np.argsort(rows)]


def _model_for(settings: AuditSettings, data: Dataset) -> nn.Module:
    if settings.model is not None:  # a built-in, the user's class (file.py:Class) or an MLP state dict
        from fedleak.models.zoo import load_model
        from fedleak.validation import output_features

        model = load_model(settings.model, weights=settings.weights, seed=settings.seed).module
        out = output_features(model)
        if out is not None and out < data.num_classes:  # more outputs than classes is fine: labels index them
            raise FedleakError(f"the model has {out} outputs but {data.name} has {data.num_classes} classes")
        return model
    if settings.conv:
        from fedleak.models.convnet import make_convnet

        return make_convnet(data.input_shape, data.num_classes, channels=settings.conv, fc_widths=settings.widths, padding=1,
                            bias=settings.bias, seed=settings.seed)
    return make_mlp(data.input_shape, settings.widths, data.num_classes, bias=settings.bias, seed=settings.seed)


def _jobs(settings: AuditSettings) -> Iterator[tuple[str, int, int]]:
    for scenario in settings.scenarios:
        for size in settings.batch_sizes:
            for trial in range(settings.trials):
                yield scenario, int(size), trial


def run_audit(
    settings: AuditSettings,
    *,
    dataset: Dataset | None = None,
    model: nn.Module | None = None,
    progress: Callable[[Iterator], Iterator] | None = None,
    showcase_sizes: Sequence[int] | None = None,
) -> AuditResult:
    """Run the audit described by ``settings`` and return typed results (nothing is written).

    ``dataset`` and ``model`` override the ones the settings name (e.g. a user's own model). The first
    trial's batch of each scenario and of each size in ``showcase_sizes`` (default: every audited size) is
    kept with its images for the report, which shows those where leakage is partial.
    """
    start = time.perf_counter()
    data = dataset if dataset is not None else load_dataset(settings.data, split=settings.split)
    too_big = [b for b in settings.batch_sizes if b > len(data)]
    if too_big:
        raise FedleakError(f"{data.name} has {len(data)} samples; batch size(s) {too_big} are larger")
    net = model if model is not None else _model_for(settings, data)
    transforms = {name: _scenario(name, settings, data) for name in settings.scenarios}
    shown = set(settings.batch_sizes if showcase_sizes is None else showcase_sizes)
    jobs = list(_jobs(settings))
    iterator = progress(iter(jobs)) if progress else iter(jobs)
    batches: list[BatchResult] = []
    showcases: list[Showcase] = []
    for scenario, size, trial in iterator:
        batch_seed = settings.seed * 1_000_003 + size * 101 + trial
        x, y = data.batch(size, seed=batch_seed)
        torch.manual_seed(batch_seed)
        t0 = time.perf_counter()
        xs, ys = transforms[scenario](net, x, y)
        t1 = time.perf_counter()
        if xs.shape[0] == 0:  # the client's transform withheld the whole batch: nothing is sent, nothing leaks
            batches.append(_withheld(scenario, size, trial, t1 - t0, net))
            continue
        update = compute_gradient_update(net, xs, ys)
        t2 = time.perf_counter()
        options = {"budget": settings.budget, "progress": False} if settings.attack == "auto" else {}
        rec = reconstruct(net, update, attack=settings.attack, **options)
        report = analyze_exclusivity(net, xs, ys)
        scores = match(rec, xs, ys, data_range=data.pixel_range, normalization=data.normalization)
        kept = _kept(x, xs)
        dropped = sorted(set(range(size)) - set(kept.tolist()))
        status, reasons = sample_reasons(report, rec, scores)
        vs_original = linf = pert_psnr = None
        if scenario != "plain":  # against the originals of the samples sent
            xk, yk = x[torch.from_numpy(kept)], y[torch.from_numpy(kept)]
            vs_original = match(rec, xk, yk, data_range=data.pixel_range, normalization=data.normalization).mean_psnr()
            linf = float((xs - xk).reshape(len(xs), -1).abs().amax(1).mean())
            pert_psnr = float(psnr(data.pixels(xs), data.pixels(xk), data.pixel_range[1] - data.pixel_range[0]).mean())
        batches.append(BatchResult(
            scenario=scenario, batch_size=size, trial=trial,
            certifiable=int(report.certifiable.sum()),
            exan_counts=[layer.effective_exans.tolist() for layer in report.layers],
            rebuilt=len(rec), certified=rec.num_certified, recovered=int(scores.recovered.sum()),
            exact=int(scores.exact.sum()), false_certificates=scores.false_certificates,
            inferred_batch_size=rec.batch_size, batch_certified=rec.batch_certified,
            label_accuracy=scores.label_accuracy, mean_psnr=scores.mean_psnr(),
            mean_ssim=float(np.nanmean(scores.ssim)) if np.isfinite(scores.ssim).any() else float("nan"),
            gradient_seconds=t2 - t1, transform_seconds=t1 - t0, attack_seconds=rec.seconds,
            per_sample={**scores.per_original(), "original": kept.tolist(), "status": status, "reason": reasons},
            psnr_vs_original=vs_original, perturbation_linf=linf, perturbation_psnr=pert_psnr, sent=int(xs.shape[0]),
            certificates=scores.per_certified(),
            withheld={"index": dropped, "reason": [_withheld_reason(scenario)] * len(dropped)},
        ))
        if trial == 0 and size in shown:
            showcases.append(_showcase(scenario, x, y, xs, rec, scores, data, kept, status, reasons))
    return AuditResult(
        settings=settings, dataset=data.name, input_shape=data.input_shape, num_classes=data.num_classes,
        batches=tuple(batches), showcases=tuple(showcases), seconds=time.perf_counter() - start,
        value_range=data.pixel_range,
    )


def _showcase(scenario: str, x: torch.Tensor, y: torch.Tensor, xs: torch.Tensor, rec, scores: MatchResult,
              data: Dataset, kept: np.ndarray, status: list[str], reasons: list[str]) -> Showcase:
    """One column per sample of the drawn batch (what was sent of it, its matched reconstruction, unclamped),
    then one per certified sample left unpaired (necessarily a false certificate: more certified samples than
    the batch holds); images in pixel space (de-normalised when the data is normalised)."""
    size = int(x.shape[0])
    false_reason = dict(scores.false_reasons())
    paired = {int(j) for j in scores.matched if j >= 0}
    extra = [j for j in false_reason if j not in paired]
    n = size + len(extra)
    shape = tuple(x.shape[1:])
    originals = np.full((n, *shape), np.nan, dtype=np.float32)
    originals[:size] = data.pixels(x).numpy()
    sent = np.full((n, *shape), np.nan, dtype=np.float32)
    sent[kept] = data.pixels(xs.detach()).numpy()
    rebuilt = np.full((n, *shape), np.nan, dtype=np.float32)
    rebuilt_labels, labels = np.full(n, -1), np.full(n, -1)
    labels[:size] = y.numpy()
    certified = np.zeros(n, dtype=bool)
    col_status = ["withheld"] * size + ["false"] * len(extra)
    col_reason = [_withheld_reason(scenario)] * size + [false_reason[j] for j in extra]
    columns = [(int(kept[i]), i, int(j)) for i, j in enumerate(scores.matched)]
    columns += [(size + k, -1, j) for k, j in enumerate(extra)]
    for col, i, j in columns:
        if i >= 0:
            col_status[col], col_reason[col] = status[i], reasons[i]
        if j < 0:
            continue
        rebuilt[col] = data.pixels(rec.inputs[j].detach().reshape(1, *shape))[0].numpy()
        rebuilt_labels[col] = int(rec.labels[j])
        certified[col] = bool(rec.certified[j])
    return Showcase(scenario, size, originals, sent, rebuilt, certified, labels, rebuilt_labels, tuple(col_status),
                    tuple(col_reason), data.pixel_range)
