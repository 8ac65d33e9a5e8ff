"""Run a leakage audit: for each batch size and scenario, draw batches, compute the client's update,
attack it, and score what came back against the truth.

The scenarios (:mod:`fedleak.audit.scenarios`) are registered client-side transforms (``plain``: an honest
client; ``fished``: the server's fishing hook) and the client defenses of ``AuditSettings.defenses``, each
named by its stack's label. Every client computes its update with
:func:`fedleak.defenses.defended_gradient`; the attack sees only the update (and, when it takes a ``defense``
option, the client's defenses: :func:`fedleak.audit.aware.reconstruct_aware`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from fedleak.analysis import analyze_exclusivity
from fedleak.attacks import get_attack
from fedleak.attacks.auto import network_barrier
from fedleak.audit.aware import reconstruct_aware
from fedleak.audit.scenarios import AuditedScenario, audited_scenarios, available_scenarios
from fedleak.audit.settings import AuditSettings
from fedleak.audit.showcase import Showcase, build_showcase, withheld_reason
from fedleak.binary import as_two_class
from fedleak.client_loss import ClientLoss, hard_labels
from fedleak.clients.mode import client_mode, one_sample_refusal
from fedleak.data import Dataset, load_dataset
from fedleak.defenses.base import Accounting
from fedleak.defenses.stack import DefendedUpdate, WithheldBatch, defended_gradient
from fedleak.errors import FedleakError, OptionError
from fedleak.image_metrics import psnr
from fedleak.metrics import match
from fedleak.models import make_mlp
from fedleak.nets.buffers import buffers_kept
from fedleak.report.samples import sample_reasons

__all__ = ["AuditResult", "BatchResult", "Showcase", "available_scenarios", "run_audit"]


@dataclass(frozen=True)
class BatchResult:
    """One attacked batch: exclusivity, what the attack found, and how it scored."""

    scenario: str
    batch_size: int
    trial: int
    certifiable: int | None  # None: the exclusivity analysis does not read the model (AuditResult.notes says why)
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
    client_seconds: float  # the client's update: its defenses, gradient and filters (defended_gradient)
    transform_seconds: float  # the registered scenario's transform (fishing), before that
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
    sent_bytes: int | None = None  # what the update costs on the wire (the last filter's encoding)
    privacy: list[dict[str, object]] = field(default_factory=list)  # the stack's (ε, δ) guarantees, if any
    defense_aware: bool | None = None  # the attack was given the client's defenses (None: there were none)

    @property
    def recovered_fraction(self) -> float:
        return self.recovered / self.batch_size

    def to_dict(self) -> dict[str, object]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["recovered_fraction"] = self.recovered_fraction
        return d


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
    descriptions: dict[str, str] = field(default_factory=dict)  # per scenario: what it is (defenses: their sources)

    def summary_rows(self) -> list[dict[str, object]]:
        """Per scenario and batch size: means over trials."""
        rows = []
        order = self.settings.scenario_names
        keys = sorted({(b.scenario, b.batch_size) for b in self.batches},
                      key=lambda k: (order.index(k[0]) if k[0] in order else len(order), k[1]))
        for scenario, size in keys:
            group = [b for b in self.batches if b.scenario == scenario and b.batch_size == size]
            n = sum(b.batch_size for b in group)
            rows.append({
                "scenario": scenario,
                "batch_size": size,
                "trials": len(group),
                "certifiable_fraction": _certifiable(group, n),
                "recovered_fraction": sum(b.recovered for b in group) / n,
                "exact_fraction": sum(b.exact for b in group) / n,
                "certified": sum(b.certified for b in group),
                "false_certificates": sum(b.false_certificates for b in group),
                "label_accuracy": _nanmean([b.label_accuracy for b in group]),
                "mean_psnr": _nanmean([b.mean_psnr for b in group]),
                "psnr_vs_original": _nanmean([b.psnr_vs_original for b in group if b.psnr_vs_original is not None]),
                "client_ms": 1000 * float(np.mean([b.client_seconds for b in group])),
                "attack_ms": 1000 * float(np.mean([b.attack_seconds for b in group])),
                "transform_ms": 1000 * float(np.mean([b.transform_seconds for b in group])),
                "perturbation_linf": _nanmean([b.perturbation_linf for b in group if b.perturbation_linf is not None]),
                "perturbation_psnr": _nanmean([b.perturbation_psnr for b in group if b.perturbation_psnr is not None]),
                "sent_bytes": _nanmean([b.sent_bytes for b in group if b.sent_bytes is not None]),
                "privacy": group[0].privacy,
                "defense_aware": group[0].defense_aware,
            })
        return rows

    def reconstructable_batch_size(self, threshold: float = 0.99) -> dict[str, int | None]:
        """Per scenario, the largest audited batch size up to which at least ``threshold`` of every batch
        was recovered (certified and exact); None if not even the smallest was."""
        out: dict[str, int | None] = {}
        for scenario in self.settings.scenario_names:
            best = None
            for row in (r for r in self.summary_rows() if r["scenario"] == scenario):
                if row["recovered_fraction"] < threshold:
                    break
                best = row["batch_size"]
            out[scenario] = best
        return out


def _certifiable(group: Sequence[BatchResult], n: int) -> float | None:
    """The certifiable fraction of ``n`` samples over ``group``'s batches; None where it was not counted."""
    counts = [b.certifiable for b in group]
    return None if None in counts else sum(counts) / n


def _nanmean(values: Sequence[float]) -> float | None:
    vals = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(vals)) if vals else None


# ---------------------------------------------------------------------------------------------------------


def _withheld(scenario: str, size: int, trial: int, transform_seconds: float, net: nn.Module,
              analysed: bool) -> BatchResult:
    depth = sum(isinstance(m, nn.ReLU) for m in net.modules()) if analysed else 0
    return BatchResult(
        scenario=scenario, batch_size=size, trial=trial, certifiable=0 if analysed else None,
        exan_counts=[[] for _ in range(depth)],
        rebuilt=0, certified=0, recovered=0, exact=0, false_certificates=0, inferred_batch_size=None,
        batch_certified=False, label_accuracy=float("nan"), mean_psnr=float("nan"), mean_ssim=float("nan"),
        client_seconds=0.0, transform_seconds=transform_seconds, attack_seconds=0.0, per_sample={}, sent=0,
        withheld={"index": list(range(size)), "reason": [withheld_reason(scenario)] * size},
    )


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
        from fedleak.models.zoo import load_model_for

        # more outputs than classes is fine (labels index them), and so is one logit for two classes (binary)
        return load_model_for(settings.model, data.input_shape, data.num_classes, weights=settings.weights,
                              seed=settings.seed, binary=True)
    if settings.conv:
        from fedleak.models.convnet import make_convnet

        return make_convnet(data.input_shape, data.num_classes, channels=settings.conv, fc_widths=settings.widths,
                            padding=1, bias=settings.bias, seed=settings.seed)
    return make_mlp(data.input_shape, settings.widths, data.num_classes, bias=settings.bias, seed=settings.seed)


def _exclusivity_notes(net: nn.Module, data: Dataset, client_mode: str) -> tuple[bool, str, tuple[str, ...]]:
    """Whether the exclusivity analysis reads ``net``; why the exclusivity attack certifies nothing from its
    updates (:func:`~fedleak.attacks.auto.network_barrier`; empty where it can); and what keeps the analysis's
    count of certifiable samples from applying: a model it does not read (GELU, a residual path, a Conv3d: the other
    attacks still audit it), or clients in training mode with Dropout or BatchNorm (the exact methods model the
    eval-mode network, which such clients do not run: nothing is certifiable)."""
    from fedleak.nets.exact_view import updated_network
    from fedleak.nets.network import training_mode_cause

    try:
        read = updated_network(as_two_class(net)[0], input_shape=data.input_shape)
    except FedleakError as exc:
        return False, f"the model is not a ReLU network the exact attack reads ({exc})", (
            f"the exclusivity analysis does not read this model ({exc}): which samples meet the ExAN condition is "
            "not counted, and the exclusivity attack does not apply",)
    training = client_mode == "train"
    barrier = network_barrier(read, training=training)
    if not training or not read.mode_dependent:
        return True, barrier, ()
    cause = training_mode_cause(read.dropout, read.norms)
    return True, barrier, (f"the clients compute their updates in training mode: {cause}; no sample is counted "
                           "certifiable (the exact condition is that of the eval-mode network); client_mode='eval' "
                           "audits clients that compute in eval mode",)


def _jobs(settings: AuditSettings) -> Iterator[tuple[str, int, int]]:
    for scenario in settings.scenario_names:
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
    settings, unaudited = _sizes_clients_compute(settings, net, data)
    analysed, barrier, notes = _exclusivity_notes(net, data, settings.client_mode)  # what its count misses
    attack = settings.attack
    if barrier and attack == "exclusivity":  # as a federation's honest server does: see the note
        attack = "auto"
        said = not analysed or any(barrier in note for note in notes)  # the note above gives the reason
        why = "certifies nothing from this model's updates" + ("" if said else f" ({barrier})")
        notes += (f"the exclusivity attack {why}: the audit ran 'auto' (the first-layer attack, then IG within "
                  f"{settings.budget:g} s per batch for what it did not certify)",)
    reading = get_attack(attack)
    scenarios = audited_scenarios(settings, data)
    for scenario in scenarios.values():  # a client hook that cannot work on this model says so before any batch runs
        if scenario.transform is not None:
            with torch.random.fork_rng(devices=[]):
                scenario.transform(net, *data.batch(1, seed=settings.seed))
    shown = set(settings.batch_sizes if showcase_sizes is None else showcase_sizes)
    jobs = list(_jobs(settings))
    iterator = progress(iter(jobs)) if progress else iter(jobs)
    batches: list[BatchResult] = []
    showcases: list[Showcase] = []
    guarantees: dict[tuple[str, int], list[dict[str, object]]] = {}
    for name, size, trial in iterator:
        scenario = scenarios[name]
        batch_seed = settings.seed * 1_000_003 + size * 101 + trial
        x, y = data.batch(size, seed=batch_seed)
        torch.manual_seed(batch_seed)
        t0 = time.perf_counter()
        xt, yt = scenario.transform(net, x, y) if scenario.transform is not None else (x, y)
        t1 = time.perf_counter()
        # back in eval mode for the server's attack, and with the BatchNorm statistics the server sent (a client in
        # training mode moves them; a FedSGD client does not send them)
        with client_mode(net, settings.client_mode), buffers_kept(net):
            client = _client_update(net, xt, yt, scenario, batch_seed, settings.loss)
        if client is None:  # the client withheld the whole batch: nothing is sent, nothing leaks
            batches.append(_withheld(name, size, trial, t1 - t0, net, analysed))
            continue
        if (name, size) not in guarantees:
            guarantees[(name, size)] = [p.to_dict() for p in scenario.stack.privacy(_accounting(size, len(data)))]
        xs, ys = client.inputs, hard_labels(client.labels)  # soft labels (MixUp) scored as their top class
        options = {"budget": settings.budget, "progress": False} if attack == "auto" else {}
        options.update(reading.range_option(data.value_range))  # normalised data: the search's box is its range
        options.update(settings.loss.options())  # the clients' loss, which the attack takes (checked above)
        # the data's shape, which the model was checked to take: where several fit, inferring one could miss it
        rec, aware = reconstruct_aware(net, client.update, attack=attack, defense=scenario.stack or None,
                                       input_shape=tuple(data.input_shape), **options)
        report = analyze_exclusivity(net, xs, ys) if analysed else None
        scores = match(rec, xs, ys, data_range=data.pixel_range, normalization=data.normalization)
        kept = _kept(x, xs)
        dropped = sorted(set(range(size)) - set(kept.tolist()))
        status, reasons = sample_reasons(report, rec, scores)
        vs_original = linf = pert_psnr = None
        if xs.shape != x.shape or not torch.equal(xs, x):  # the client changed its batch: compare with the originals
            xk, yk = x[torch.from_numpy(kept)], y[torch.from_numpy(kept)]
            as_shown = scenario.bound.shown(xk, rec.inputs)  # a flipped image shows the image
            vs_original = match(rec, as_shown, yk, data_range=data.pixel_range,
                                normalization=data.normalization).mean_psnr()
            linf = float((xs - xk).reshape(len(xs), -1).abs().amax(1).mean())
            pert_psnr = float(psnr(data.pixels(xs), data.pixels(xk), data.pixel_range[1] - data.pixel_range[0]).mean())
        batches.append(BatchResult(
            scenario=name, batch_size=size, trial=trial,
            # None: not analysed; 0 with notes: the clients ran another network (training mode) than the one analysed
            certifiable=None if report is None else 0 if notes else int(report.certifiable.sum()),
            exan_counts=[] if report is None else [layer.effective_exans.tolist() for layer in report.layers],
            rebuilt=len(rec), certified=rec.num_certified, recovered=int(scores.recovered.sum()),
            exact=int(scores.exact.sum()), false_certificates=scores.false_certificates,
            inferred_batch_size=rec.batch_size, batch_certified=rec.batch_certified,
            label_accuracy=scores.label_accuracy, mean_psnr=scores.mean_psnr(),
            mean_ssim=float(np.nanmean(scores.ssim)) if np.isfinite(scores.ssim).any() else float("nan"),
            client_seconds=client.seconds, transform_seconds=t1 - t0, attack_seconds=rec.seconds,
            per_sample={**scores.per_original(), "original": kept.tolist(), "status": status, "reason": reasons},
            psnr_vs_original=vs_original, perturbation_linf=linf, perturbation_psnr=pert_psnr, sent=int(xs.shape[0]),
            certificates=scores.per_certified(),
            withheld={"index": dropped, "reason": [withheld_reason(name)] * len(dropped)},
            sent_bytes=client.sent_bytes, privacy=guarantees[(name, size)], defense_aware=aware,
        ))
        if trial == 0 and size in shown:
            showcases.append(build_showcase(name, x, y, xs, rec, scores, data, kept, status, reasons))
    read = () if data.normalization is None else (
        f"the data is read as its model sees it, {data.normalization.describe()}; scores and pictures are in pixels",)
    if not settings.loss.plain:
        read += (f"the clients train with {settings.loss.describe()}, and the attack is told so",)
    return AuditResult(
        settings=settings, dataset=data.name, input_shape=data.input_shape, num_classes=data.num_classes,
        batches=tuple(batches), showcases=tuple(showcases), seconds=time.perf_counter() - start,
        value_range=data.pixel_range, descriptions={n: sc.description for n, sc in scenarios.items()},
        notes=notes + read + unaudited,
    )


def _sizes_clients_compute(settings: AuditSettings, net: nn.Module, data: Dataset) -> tuple[AuditSettings,
                                                                                             tuple[str, ...]]:
    """The settings without batch size 1 where a client in training mode cannot compute one sample (BatchNorm over
    a dense layer: torch refuses it, as it would refuse that client), and the note that says so; a refusal where 1
    is the only size asked for."""
    if settings.client_mode != "train" or 1 not in settings.batch_sizes:
        return settings, ()
    why = one_sample_refusal(net, data.x[:1])
    if not why:
        return settings, ()
    if set(settings.batch_sizes) == {1}:
        raise OptionError(f"a client in training mode cannot compute a batch of one ({why}): audit batch sizes of 2 "
                          "or more, or clients in eval mode (client_mode='eval')")
    kept = tuple(b for b in settings.batch_sizes if b != 1)
    return replace(settings, batch_sizes=kept), (
        f"batch size 1 is not audited: a client in training mode cannot compute one sample ({why}; "
        "client_mode='eval')",)


def _client_update(net: nn.Module, x: torch.Tensor, y: torch.Tensor, scenario: AuditedScenario,
                   seed: int, loss: ClientLoss) -> DefendedUpdate | None:
    """The update the scenario's client, training with ``loss``, sends for ``(x, y)``; None when it sends nothing
    (every sample withheld, by the registered transform or by a batch defense)."""
    if x.shape[0] == 0:
        return None
    try:
        return defended_gradient(net, x, y, scenario.bound, seed=seed, loss=loss)
    except WithheldBatch:
        return None


def _accounting(batch_size: int, dataset_size: int) -> Accounting:
    """A FedSGD client's one update: one round, one step on a batch of ``batch_size`` of its ``dataset_size``
    samples (the audited data set), ``delta = min(1e-5, 1 / dataset_size)``."""
    return Accounting(rounds=1, local_steps=1, batch_size=batch_size, dataset_size=dataset_size,
                      delta=min(1e-5, 1.0 / dataset_size))
