"""Typed records of an audit under secure aggregation: one :class:`AggregateRecord` per round.

Under SecAgg+ the server never holds a client's update, only the weighted average of the sampled clients'
uploads, so the audit attacks that aggregate as one update of the *union* of the clients' batches, and its record
replaces the per-client records of an ordinary run. Scores (evaluation only) are against every contributing
client's true batch: the fraction of the whole round's data recovered, and per client how many of its samples.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedleak.federation.results import Scores, json_float


@dataclass(frozen=True)
class ClientShare:
    """One client's part of a round's aggregate: its partition (``client``, -1 if it sent none) and Flower node,
    the samples its upload covers, and (evaluation only) how many of them the attack on the aggregate recovered
    (certified, exact, right label)."""

    node_id: int
    client: int
    num_examples: int
    recovered: int | None = None

    def to_dict(self) -> dict[str, object]:
        return {"node_id": self.node_id, "client": self.client, "num_examples": self.num_examples,
                "recovered": self.recovered}


@dataclass(frozen=True)
class Quantization:
    """SecAgg+'s error on the aggregate. ``bound``: the per-entry bound the server knows from its settings
    (:meth:`~fedleak.federation.secagg_config.SecAggConfig.error_bound`). Evaluation only (None without the
    clients' exact uploads): ``max_error`` and ``relative_error`` (L2) of the aggregate against the exact weighted
    average of the uploads, and ``clipped`` upload entries that exceeded the clipping range (an error no bound
    covers)."""

    clipping_range: float
    quantization_range: int
    max_weight: float
    bound: float
    max_error: float | None = None
    relative_error: float | None = None
    clipped: int | None = None

    def to_dict(self) -> dict[str, object]:
        return {"clipping_range": self.clipping_range, "quantization_range": self.quantization_range,
                "max_weight": self.max_weight, "error_bound": json_float(self.bound),
                "max_error": json_float(self.max_error), "relative_error": json_float(self.relative_error),
                "clipped_entries": self.clipped}


@dataclass(frozen=True)
class ServerView:
    """What the server received in a round, counted on its Grid: ``replies`` (all SecAgg+ stages),
    ``masked_vectors`` (replies carrying a masked upload) and ``plain_arrays`` (replies carrying arrays in the
    clear: 0 under SecAgg+, whose client mod empties them), and ``aggregates`` handed to the strategy."""

    replies: int
    masked_vectors: int
    plain_arrays: int
    aggregates: int

    def to_dict(self) -> dict[str, object]:
        return {"replies": self.replies, "masked_vectors": self.masked_vectors, "plain_arrays": self.plain_arrays,
                "aggregates": self.aggregates}


@dataclass(frozen=True)
class AggregateRecord:
    """The audit of one round's aggregate (what a server under secure aggregation sees).

    ``status``: "ok", "attack-error" (the attack raised; ``detail`` says why) or "halted" (SecAgg+ did not
    complete, e.g. too few clients answered: nothing was aggregated). ``num_examples``: the union batch, the sum of
    the shares' ``num_examples``. ``certified`` counts certificates, whose tolerances include SecAgg+'s
    quantization bound (see :func:`fedleak.federation.aggregate_audit.run_aggregate_audit`).
    ``scores`` (evaluation only) are against the union of the contributing clients' true batches.
    """

    round: int
    status: str
    shares: tuple[ClientShare, ...]
    quantization: Quantization | None
    view: ServerView | None = None
    detail: str = ""
    attack: str | None = None
    rebuilt: int = 0
    certified: int = 0
    attack_seconds: float | None = None
    scores: Scores | None = None
    update_kind: str = ""
    reason: str = ""
    update_norm: float | None = None
    defense_aware: bool | None = None
    notes: tuple[str, ...] = ()

    @property
    def num_examples(self) -> int:
        return sum(s.num_examples for s in self.shares)

    @property
    def clients_touched(self) -> int | None:
        """Clients at least one of whose samples was recovered (None: not scored)."""
        if self.scores is None:
            return None
        return sum(1 for s in self.shares if (s.recovered or 0) > 0)

    def summary(self) -> str:
        """One line: what the attack on the round's aggregate got."""
        if self.status != "ok":
            return f"round {self.round} aggregate: {self.status}: {self.detail}"
        text = (f"round {self.round} aggregate of {len(self.shares)} clients ({self.num_examples} samples): "
                f"{self.certified} certified")
        if self.scores is not None:
            per = " ".join(str(s.recovered) for s in self.shares)
            text += (f", {self.scores.recovered} certified and exact ({self.scores.recovered_fraction:.1%} of the "
                     f"round's data) from {self.clients_touched} client(s) (per client: {per})")
        return text

    def to_dict(self, test_accuracy: float | None = None) -> dict[str, object]:
        s = self.scores
        return {
            "round": self.round,
            "unit": "round aggregate (secure aggregation: the server saw no individual update)",
            "status": self.status,
            "detail": self.detail,
            "clients": len(self.shares),
            "shares": [c.to_dict() for c in self.shares],
            "num_examples": self.num_examples,
            "attack": self.attack,
            "update_kind": self.update_kind,
            "reason": self.reason,
            "rebuilt": self.rebuilt,
            "certified": self.certified,
            "recovered": s.recovered if s else None,
            "recovered_fraction": json_float(s.recovered_fraction) if s else None,
            "clients_touched": self.clients_touched,
            "psnr": json_float(s.psnr) if s else None,
            "ssim": json_float(s.ssim) if s else None,
            "label_accuracy": json_float(s.label_accuracy) if s else None,
            "false_certificates": s.false_certificates if s else None,
            "false_certificate_reasons": list(s.false_certificate_reasons) if s else None,
            "attack_seconds": json_float(self.attack_seconds),
            "update_norm": json_float(self.update_norm),
            "defense_aware": self.defense_aware,
            "quantization": self.quantization.to_dict() if self.quantization else None,
            "server_view": self.view.to_dict() if self.view else None,
            "test_accuracy": json_float(test_accuracy),
            "notes": list(self.notes),
        }
