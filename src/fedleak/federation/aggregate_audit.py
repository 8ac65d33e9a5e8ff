"""The audit of a round's aggregate under secure aggregation (Flower-free, so it can be tested on its own).

Under SecAgg+ every sampled client takes its step from the same weights, so the weighted average of their one-step
changes is ``lr`` times the mean-loss gradient of the *union* of their batches: one update of ``sum(num_examples)``
samples. :func:`run_aggregate_audit` attacks it as such (the plan's attack: exclusivity for an honest-but-curious
server, trap weights or imprint for a malicious one; several local steps go to the plan's multi-step attack).

SecAgg+'s quantization puts an error on every entry of the aggregate, below a bound the server knows
(:meth:`~fedleak.federation.secagg_config.SecAggConfig.error_bound`). The update the attacks receive carries that
bound (``error``), and their certificates widen their tolerances by it: a coarser quantization certifies fewer
samples, never a wrong one.

Evaluation only, :class:`AggregateScorer` scores the reconstruction against the union of the contributing clients'
true batches (and each client's share of what was recovered), and measures the quantization error against the
clients' exact uploads, which the ClientApp writes to the run's private ground-truth folder (never into a Flower
message; the attack never reads them).
"""

from __future__ import annotations

import dataclasses
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedleak.data.normalize import Normalization
from fedleak.errors import FedleakError
from fedleak.federation.aggregate_record import AggregateRecord, ClientShare, Quantization, ServerView
from fedleak.federation.audit_worker import AuditPlan, uploaded_change
from fedleak.federation.results import Scores
from fedleak.federation.secagg_config import SecAggConfig
from fedleak.reconstruction import Reconstruction
from fedleak.updates import WeightUpdate, trainable_parameters

UPLOADS = "secagg-uploads"  # subfolder of the ground-truth folder: the clients' exact uploads (evaluation only)
UNION = "secagg-union"  # subfolder: each round's union batch, as the per-client scorer reads batches


@dataclass(frozen=True)
class AggregateInput:
    """What the server has after a SecAgg+ round: the weights it sent (in ``model``), the aggregate change
    ``sent - new`` (``delta``), the clients that contributed (their ``num_examples`` and metrics arrive in the
    clear), the SecAgg+ settings, and what it knows of the clients' training (``declared``)."""

    server_round: int
    model: nn.Module
    delta: Mapping[str, torch.Tensor]
    shares: tuple[ClientShare, ...]
    config: SecAggConfig
    upload: str = "delta"
    aggregate: Mapping[str, torch.Tensor] = field(default_factory=dict)  # the average SecAgg+ returned, float64
    declared: Mapping[str, Any] = field(default_factory=dict)
    data_range: tuple[float, float] = (0.0, 1.0)

    @property
    def num_examples(self) -> int:
        return sum(s.num_examples for s in self.shares)

    @property
    def bound(self) -> float:
        """The per-entry quantization bound of ``delta`` (the server's settings and the clients' weights)."""
        return self.config.error_bound(tuple(s.num_examples for s in self.shares))


@dataclass(frozen=True)
class AggregateScores:
    """Evaluation-only scores of one round: ``scores`` against the union batch, ``recovered`` per share (in the
    order of ``AggregateInput.shares``), and the measured quantization error (``max_error``, ``relative_error``,
    ``clipped``: None without the exact uploads)."""

    scores: Scores
    recovered: tuple[int, ...]
    max_error: float | None = None
    relative_error: float | None = None
    clipped: int | None = None


AggregateScorer = Callable[[AggregateInput, Reconstruction], AggregateScores | None]


def run_aggregate_audit(plan: AuditPlan, job: AggregateInput, scorer: AggregateScorer | None = None,
                        view: ServerView | None = None) -> AggregateRecord:
    """Attack the round's aggregate with ``plan``, its quantization bound as the update's known error (see the
    module docstring), then (evaluation only) score it. Never raises: a failure is an "attack-error" record."""
    from fedleak.audit.aware import reconstruct_aware
    from fedleak.update_kind import describe_update

    start = time.perf_counter()
    quant = Quantization(job.config.clipping_range, job.config.quantization_range, job.config.max_weight, job.bound)
    kind = None
    try:
        sent = {k: v.detach() for k, v in job.model.state_dict().items()}
        delta32 = {k: job.delta[k].to(sent[k].dtype) for k in sent}
        lr = job.declared.get("learning_rate")  # the learning rate the server set, where its attack takes it
        weights = WeightUpdate(sent, {k: sent[k] - delta32[k] for k in sent}, num_examples=job.num_examples,
                               learning_rate=lr)
        kind = describe_update(weights, job.model, declared=job.declared)
        attack = plan.multi_step_attack if kind.multi_step and plan.multi_step_attack is not None else plan.attack
        options = dict(plan.options) if attack == plan.attack else dict(plan.multi_step_options)
        as_weights = attack != plan.attack or plan.update_kind == "weights"

        update: Any = dataclasses.replace(weights, local_steps=kind.local_steps, error=job.bound)
        if not as_weights:  # the change of the trainable parameters (no buffers), as a gradient
            update, scale = uploaded_change(delta32, trainable_parameters(job.model), job.num_examples, lr, job.bound)
            options.update(scale if "known_scale" in options else {})
        rec, aware = reconstruct_aware(job.model, update, attack=attack, defense=plan.defense, **options)
        seconds = time.perf_counter() - start
        scored = scorer(job, rec) if scorer is not None else None
        shares = job.shares
        if scored is not None:
            shares = tuple(dataclasses.replace(s, recovered=n) for s, n in zip(job.shares, scored.recovered))
            quant = dataclasses.replace(quant, max_error=scored.max_error, relative_error=scored.relative_error,
                                        clipped=scored.clipped)
        norm = float(sum(float(v.double().pow(2).sum()) for v in job.delta.values()) ** 0.5)
        return AggregateRecord(job.server_round, "ok", shares, quant, view, rec.summary(), rec.attack, len(rec),
                               rec.num_certified, seconds, scored.scores if scored else None,
                               kind.summary(), rec.why_uncertified(), norm, aware, tuple(rec.notes))
    except Exception as exc:  # noqa: BLE001 - an attack failure must not end the federation
        detail = f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, FedleakError):
            detail += " | " + traceback.format_exc(limit=3).replace("\n", " ")
        return AggregateRecord(job.server_round, "attack-error", job.shares, quant, view, detail,
                               update_kind=kind.summary() if kind is not None else "")


# ---- evaluation only: the clients' exact uploads, and scoring against the union batch

def _upload_path(folder: str | Path, server_round: int, node_id: int) -> Path:
    return Path(folder) / UPLOADS / f"r{int(server_round)}-n{int(node_id)}.safetensors"


def write_exact_upload(
    folder: str | Path, server_round: int, node_id: int, tensors: Mapping[str, torch.Tensor]
) -> None:
    """Client side (evaluation only): store the upload before SecAgg+ quantizes and masks it."""
    from safetensors.torch import save

    from fedleak.report.output import write_bytes_atomic

    path = _upload_path(folder, server_round, node_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, save({k: v.detach().contiguous().clone() for k, v in tensors.items()}))


def read_exact_upload(folder: str | Path, server_round: int, node_id: int) -> dict[str, torch.Tensor] | None:
    from safetensors.torch import load_file

    path = _upload_path(folder, server_round, node_id)
    return load_file(str(path)) if path.is_file() else None


@dataclass(frozen=True)
class _BatchKey:
    """Where :class:`~fedleak.federation.ground_truth.GroundTruthScorer` finds a batch: round and node."""

    server_round: int
    node_id: int


class UnionScorer:
    """Evaluation-only :data:`AggregateScorer` (picklable): reads every contributing client's true batch from the
    run's ground-truth folder, scores the reconstruction against their union with the per-client scorer
    (:class:`~fedleak.federation.ground_truth.GroundTruthScorer`: certified, exact, right label; false certificates
    against every sample of the round), counts each client's recovered samples, and measures the quantization error
    of the aggregate against the exact weighted average of the clients' uploads."""

    def __init__(self, folder: str | Path, data_range: tuple[float, float] | None = None, preview: int = 8,
                 normalization: Normalization | None = None) -> None:
        self.folder = str(folder)
        self.data_range = tuple(data_range) if data_range is not None else None
        self.preview = int(preview)
        self.normalization = normalization

    def __call__(self, job: AggregateInput, rec: Reconstruction) -> AggregateScores | None:
        from fedleak.federation.ground_truth import GroundTruthScorer, TrueBatch, read_true_batch, write_true_batch
        from fedleak.metrics import match

        batches = [read_true_batch(self.folder, job.server_round, s.node_id) for s in job.shares]
        if not batches or any(b is None for b in batches):
            return None
        union = TrueBatch(torch.cat([b.inputs for b in batches]), torch.cat([b.original for b in batches]),
                          torch.cat([b.labels for b in batches]), -1, batches[0].value_range or self.data_range)
        union_dir = Path(self.folder) / UNION
        write_true_batch(union_dir, job.server_round, 0, union)
        scorer = GroundTruthScorer(union_dir, self.preview, self.data_range, self.normalization)
        scores = scorer(_BatchKey(job.server_round, 0), rec)
        m = match(rec, union.inputs, union.labels, data_range=scores.value_range, normalization=self.normalization)
        recovered, start = [], 0
        for b in batches:
            recovered.append(int(m.recovered[start : start + len(b.inputs)].sum()))
            start += len(b.inputs)
        return AggregateScores(scores, tuple(recovered), *self._quantization(job))

    def _quantization(self, job: AggregateInput) -> tuple[float | None, float | None, int | None]:
        uploads = [read_exact_upload(self.folder, job.server_round, s.node_id) for s in job.shares]
        if not job.aggregate or any(u is None for u in uploads):
            return None, None, None
        total = sum(s.num_examples for s in job.shares)
        err2 = ref2 = 0.0
        worst, clipped = 0.0, 0
        for k, got in job.aggregate.items():
            exact = sum(s.num_examples * u[k].double() for s, u in zip(job.shares, uploads)) / total
            diff = got.double() - exact
            worst = max(worst, float(diff.abs().max()))
            err2 += float(diff.pow(2).sum())
            ref2 += float(exact.pow(2).sum())
            clipped += sum(int((job.config.weight(s.num_examples) * u[k].double()).abs()
                               .gt(job.config.clipping_range).sum()) for s, u in zip(job.shares, uploads))
        return worst, (err2 / ref2) ** 0.5 if ref2 > 0 else None, clipped
