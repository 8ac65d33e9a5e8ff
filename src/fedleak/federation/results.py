"""Typed records of an audited federation; ``results.json`` is their ``to_dict``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from fedleak.reconstruction import Reconstruction

if TYPE_CHECKING:
    from fedleak.federation.aggregate_record import AggregateRecord
    from fedleak.federation.membership import MembershipRecord


def json_float(x: float | None) -> float | None:
    """JSON-safe float: NaN/inf become None."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass(frozen=True)
class Scores:
    """Evaluation-only scores of one attack against the client's true batch.

    ``recovered_fraction``: certified, exact and rightly labelled samples / batch
    (fedleak.metrics.match, tolerance ``1e-4 x`` the data range); ``psnr``: mean over matched samples
    (on the data range, capped at 100 dB by the metric); ``psnr_original``: the same against the batch
    before any client-side transform; ``false_certificates``: every certified sample that is not a
    distinct sample of the batch (a blend, a wrong label, a second copy, one beyond the batch size),
    each with its reason in ``false_certificate_reasons``; it must be 0. ``value_range``: the (lo, hi)
    the scores were measured on. ``preview``: up to 8 ``(original, rebuilt, status, reason)`` entries for
    the report (not in JSON): the sample paired with each original (``rebuilt`` None if none; ``status``
    "certified", "false" or "uncertified", with the sample's reason), then one entry per false certificate
    beyond the batch (``original`` None). ``psnr``, ``ssim`` and ``label_accuracy`` cover uncertified
    samples too: for them they are estimates of what the attack recovered, not proofs.
    """

    batch_size: int
    recovered: int
    recovered_fraction: float
    psnr: float | None
    psnr_original: float | None
    label_accuracy: float | None
    false_certificates: int
    preview: tuple[tuple[np.ndarray | None, np.ndarray | None, str, str], ...] = field(default=(), repr=False,
                                                                                       compare=False)
    false_certificate_reasons: tuple[str, ...] = ()
    value_range: tuple[float, float] | None = None
    ssim: float | None = None  # mean over matched samples, like ``psnr``


@dataclass(frozen=True)
class ClientRecord:
    """One client in one round: status, what the attack rebuilt, and (evaluation) how well."""

    round: int
    client: int  # partition id (-1 if unknown)
    node_id: int
    status: str  # "ok", "failed" (client error), "malformed" (bad update, skipped), "attack-error"
    detail: str = ""
    num_examples: int | None = None
    attack: str | None = None
    rebuilt: int = 0
    certified: int = 0
    attack_seconds: float | None = None
    scores: Scores | None = None
    notes: tuple[str, ...] = ()
    update_kind: str = ""  # fedleak.update_kind.UpdateKind.summary(): e.g. "multi-step FedAvg update: ..."
    multi_step: bool = False
    reason: str = ""  # why samples are not certified (the first uncertified sample's reason), "" if all are
    defense_aware: bool | None = None  # the attack was given the clients' defenses (None: there were none)
    update_norm: float | None = None  # L2 norm of the change the server received

    @classmethod
    def skipped(cls, rnd: int, node: int, partition: int, status: str, detail: str,
                num_examples: int | None = None, update_kind: str = "", multi_step: bool = False) -> ClientRecord:
        return cls(rnd, partition, node, status, detail, num_examples, update_kind=update_kind,
                   multi_step=multi_step)

    @classmethod
    def from_attack(cls, rnd: int, node: int, partition: int, num_examples: int | None, rec: Reconstruction,
                    seconds: float, scores: Scores | None, update_kind: str = "", multi_step: bool = False, *,
                    defense_aware: bool | None = None, update_norm: float | None = None) -> ClientRecord:
        return cls(rnd, partition, node, "ok", rec.summary(), num_examples, rec.attack, len(rec), rec.num_certified,
                   seconds, scores, tuple(rec.notes), update_kind, multi_step, rec.why_uncertified(), defense_aware,
                   update_norm)

    @property
    def client_id(self) -> int:
        """The client's partition id when it sent one, else Flower's node id (never -1)."""
        return self.client if self.client >= 0 else self.node_id

    @property
    def client_label(self) -> str:
        """"partition 3", or "node 876412…" (Flower's node id, shortened) when the client sent no partition id."""
        if self.client >= 0:
            return f"partition {self.client}"
        node = str(self.node_id)
        return f"node {node[:6]}…" if len(node) > 8 else f"node {node}"

    def to_dict(self, test_accuracy: float | None = None) -> dict[str, object]:
        s = self.scores
        return {
            "round": self.round,
            "client": self.client,
            "client_id": self.client_id,
            "client_label": self.client_label,
            "node_id": self.node_id,
            "status": self.status,
            "detail": self.detail,
            "num_examples": self.num_examples,
            "attack": self.attack,
            "route": self.attack,
            "update_kind": self.update_kind,
            "multi_step": self.multi_step,
            "reason": self.reason,
            "rebuilt": self.rebuilt,
            "certified": self.certified,
            "recovered": s.recovered if s else None,
            "recovered_fraction": json_float(s.recovered_fraction) if s else None,
            "psnr": json_float(s.psnr) if s else None,
            "ssim": json_float(s.ssim) if s else None,
            "scores_estimated": (s.recovered < s.batch_size) if s else None,
            "psnr_vs_original": json_float(s.psnr_original) if s else None,
            "label_accuracy": json_float(s.label_accuracy) if s else None,
            "false_certificates": s.false_certificates if s else None,
            "false_certificate_reasons": list(s.false_certificate_reasons) if s else None,
            "value_range": list(s.value_range) if s and s.value_range is not None else None,
            "attack_seconds": json_float(self.attack_seconds),
            "defense_aware": self.defense_aware,
            "update_norm": json_float(self.update_norm),
            "test_accuracy": json_float(test_accuracy),
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class RoundAudit:
    """What the audit did with one round's updates.

    ``received``: valid updates the server received (failed and malformed replies are not updates);
    ``audited``: those handed to the attack; ``backlog``: audit jobs still pending when the round's updates
    arrived; ``bound``: the backlog bound (None: none); ``seed``: the seed of the sample (None: every update was
    audited); ``lag_seconds``: from the end of the round's aggregation to its last audit result (0 when the audit
    finished first; None when nothing of the round was audited)."""

    round: int
    received: int
    audited: int
    backlog: int
    bound: int | None
    seed: int | None
    lag_seconds: float | None = None

    @property
    def sampled(self) -> bool:
        """True when the backlog bound made the audit skip some of this round's updates."""
        return self.audited < self.received

    def to_dict(self) -> dict[str, object]:
        return {"updates_received": self.received, "updates_audited": self.audited, "audit_backlog": self.backlog,
                "audit_backlog_bound": self.bound, "audit_sample_seed": self.seed,
                "audit_lag_seconds": json_float(self.lag_seconds)}

    def text(self) -> str:
        """"audited 3 of 10 updates (backlog 7 of bound 10; seeded sample)", or "audited all 10 updates"."""
        if not self.sampled:
            return f"audited all {self.received} update(s)"
        return (f"audited {self.audited} of {self.received} updates (audit backlog {self.backlog} against a bound of "
                f"{self.bound}: a sample drawn with seed {self.seed}, the rest not audited)")


ROUND_AUDIT_KEYS = ("updates_received", "updates_audited", "audit_backlog", "audit_backlog_bound",
                    "audit_sample_seed", "audit_lag_seconds")


@dataclass(frozen=True)
class RoundRecord:
    """The global model after a round (round 0: the initial model) and the round's wall time."""

    round: int
    test_accuracy: float
    test_loss: float
    seconds: float | None
    clients_ok: int
    clients_skipped: int
    sampled: tuple[int, ...] = ()  # the clients Flower sampled (partition ids, else node ids)
    audit: RoundAudit | None = None  # updates received and audited, backlog, lag (None: round 0 or no audit)

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "round": self.round, "test_accuracy": json_float(self.test_accuracy),
            "test_loss": json_float(self.test_loss), "seconds": json_float(self.seconds),
            "clients_ok": self.clients_ok, "clients_skipped": self.clients_skipped}
        if self.round:
            out["sampled"] = list(self.sampled)
            out.update(self.audit.to_dict() if self.audit is not None else dict.fromkeys(ROUND_AUDIT_KEYS))
        return out


@dataclass(frozen=True)
class DefenseRecord:
    """The clients' defense stack in a run: its label, the specs it was given as, the defenses Flower realised
    itself (its mods / strategy wrapper), the training the accountant was told of, and every (ε, δ) guarantee
    of the stack (:meth:`fedleak.defenses.Privacy.to_dict`; none: no formal guarantee)."""

    stack: str
    specs: tuple[str, ...]
    flower_native: tuple[str, ...]
    accounting: dict[str, object]
    privacy: tuple[dict[str, object], ...]

    def privacy_text(self) -> str:
        if not self.privacy:
            return "no formal privacy guarantee"
        return "; ".join(f"epsilon {_eps(p['epsilon'])} at delta {float(p['delta']):.3g} per {p['unit']} "
                         f"({p['accountant']})" for p in self.privacy)

    def to_dict(self) -> dict[str, object]:
        return {"stack": self.stack, "specs": list(self.specs), "flower_native": list(self.flower_native),
                "accounting": dict(self.accounting),
                "privacy": [{**p, "epsilon": json_float(p["epsilon"])} for p in self.privacy]}


def _eps(value: object) -> str:
    return f"{float(value):.3g}" if math.isfinite(float(value)) else "infinite"


@dataclass(frozen=True)
class FederationResult:
    """A whole run: settings, versions, per-round model quality, per-(round, client) leakage and the clients'
    defenses with their privacy guarantees."""

    settings: dict[str, object]
    versions: dict[str, str]
    rounds: tuple[RoundRecord, ...]
    records: tuple[ClientRecord, ...]
    seconds: float
    audit_wait_seconds: float
    defenses: tuple[DefenseRecord, ...] = ()
    audit_backlog_at_end: int | None = None  # audit jobs still pending when the last round was aggregated
    aggregates: tuple[AggregateRecord, ...] = ()  # secure aggregation: one audit of the aggregate per round
    membership: tuple[MembershipRecord, ...] = ()  # the server's membership scores per round, client and score

    @property
    def audit_unit(self) -> str:
        """What was audited: each client's update, or (secure aggregation) each round's aggregate."""
        return "round aggregate" if self.settings.get("secagg") else "client update"

    def test_accuracy(self, rnd: int) -> float | None:
        return next((r.test_accuracy for r in self.rounds if r.round == rnd), None)

    def to_dict(self) -> dict[str, object]:
        return {
            "format": "fedleak-federation-results",
            "version": 1,
            "settings": self.settings,
            "versions": self.versions,
            "seconds": json_float(self.seconds),
            "audit_wait_seconds": json_float(self.audit_wait_seconds),
            "audit_backlog_at_end": self.audit_backlog_at_end,
            "rounds": [r.to_dict() for r in self.rounds],
            "records": [c.to_dict(self.test_accuracy(c.round)) for c in self.records],
            "defenses": [d.to_dict() for d in self.defenses],
            "audit_unit": self.audit_unit,
            "aggregates": [a.to_dict(self.test_accuracy(a.round)) for a in self.aggregates],
            "membership": [m.to_dict() for m in self.membership],
        }
