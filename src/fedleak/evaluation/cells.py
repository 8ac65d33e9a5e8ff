"""The results of a defense evaluation: one typed record per grid cell, and their summary per defense setting.

A :class:`LeakageCell` is one attack on one defense setting (all trials); a :class:`UtilityCell` is one defense
setting's federated training (utility, cost, privacy). :class:`DefenseRow` joins them for one setting: the best
attack's leakage, the utility against the baseline, the cost and ε.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


def _nanmean(values: Sequence[float]) -> float:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return sum(vals) / len(vals) if vals else float("nan")


@dataclass(frozen=True)
class LeakageCell:
    """One attack against one defense setting, over the evaluation's trials (``samples`` originals in all).

    ``recovered``: originals rebuilt exactly under a sound certificate; ``leaked``: originals whose matched
    reconstruction reaches the evaluation's PSNR threshold (certified or not); ``psnr`` / ``ssim`` means over
    matched originals; ``label_accuracy`` of the matched labels; ``false_certificates`` (certificates that
    are not exact to a sample the client trained on, after its batch defenses) must stay 0;
    ``defense_aware``: the attack modelled the defense; ``errors``: trials where the attack gave up (its message).
    """

    defense: str
    attack: str
    samples: int
    recovered: int
    leaked: int
    psnr: float
    ssim: float
    label_accuracy: float
    false_certificates: int
    seconds: float
    defense_aware: bool
    errors: tuple[str, ...] = ()

    kind = "leakage"

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.defense, self.attack)

    @property
    def recovered_fraction(self) -> float:
        return self.recovered / self.samples

    @property
    def leaked_fraction(self) -> float:
        return self.leaked / self.samples

    def to_dict(self) -> dict[str, object]:
        d = dataclasses.asdict(self)
        d.update(kind=self.kind, recovered_fraction=self.recovered_fraction, leaked_fraction=self.leaked_fraction)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> LeakageCell:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in names}
        values["errors"] = tuple(values.get("errors", ()))  # type: ignore[arg-type]
        values.update({k: float("nan") if values.get(k) is None else values[k] for k in ("psnr", "ssim",
                                                                                         "label_accuracy")})
        return cls(**values)  # type: ignore[arg-type]


@dataclass(frozen=True)
class UtilityCell:
    """One defense setting's federated training: test ``accuracy`` after the rounds, the client's mean compute
    seconds and bytes sent per round, and every (ε, δ) the setting gives (as dicts, see ``Privacy``)."""

    defense: str
    accuracy: float
    train_loss: float
    client_seconds: float
    sent_bytes: float
    privacy: tuple[Mapping[str, object], ...] = ()
    error: str = ""

    kind = "utility"

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.defense, "")

    @property
    def epsilon(self) -> float | None:
        """The smallest ε among the setting's guarantees (None: it has none)."""
        eps = [float(p["epsilon"]) for p in self.privacy]  # type: ignore[arg-type]
        return min(eps) if eps else None

    def to_dict(self) -> dict[str, object]:
        d = dataclasses.asdict(self)
        d.update(kind=self.kind, privacy=[dict(p) for p in self.privacy])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> UtilityCell:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in names}
        values["privacy"] = tuple(dict(p) for p in values.get("privacy", ()))  # type: ignore[union-attr]
        values.update({k: float("nan") if values.get(k) is None else values[k] for k in ("accuracy", "train_loss")})
        return cls(**values)  # type: ignore[arg-type]


Cell = LeakageCell | UtilityCell
CELL_TYPES: dict[str, type[LeakageCell] | type[UtilityCell]] = {"leakage": LeakageCell, "utility": UtilityCell}


@dataclass(frozen=True)
class DefenseRow:
    """One defense setting: its best attack's leakage, its utility and cost against the baseline, its ε."""

    defense: str
    leakage: tuple[LeakageCell, ...]
    utility: UtilityCell
    baseline: UtilityCell

    @property
    def best(self) -> LeakageCell:
        """The attack that leaked most (leaked fraction, then PSNR)."""
        return max(self.leakage, key=lambda c: (c.leaked_fraction, c.recovered_fraction,
                                                c.psnr if math.isfinite(c.psnr) else -1.0))

    @property
    def accuracy_drop(self) -> float:
        return self.baseline.accuracy - self.utility.accuracy

    @property
    def time_ratio(self) -> float:
        return self.utility.client_seconds / self.baseline.client_seconds

    @property
    def bytes_ratio(self) -> float:
        return self.utility.sent_bytes / self.baseline.sent_bytes

    def to_dict(self) -> dict[str, object]:
        best = self.best
        return {
            "defense": self.defense, "best_attack": best.attack, "leaked_fraction": best.leaked_fraction,
            "recovered_fraction": max(c.recovered_fraction for c in self.leakage),
            "best_psnr": max((c.psnr for c in self.leakage if math.isfinite(c.psnr)), default=float("nan")),
            "mean_ssim": _nanmean([best.ssim]), "label_accuracy": best.label_accuracy,
            "accuracy": self.utility.accuracy, "accuracy_drop": self.accuracy_drop,
            "client_seconds": self.utility.client_seconds, "time_ratio": self.time_ratio,
            "sent_bytes": self.utility.sent_bytes, "bytes_ratio": self.bytes_ratio, "epsilon": self.utility.epsilon,
            "per_attack": {c.attack: {"leaked_fraction": c.leaked_fraction, "recovered_fraction":
                                      c.recovered_fraction, "psnr": c.psnr} for c in self.leakage},
        }


def pareto_front(rows: Sequence[DefenseRow]) -> list[str]:
    """The settings no other setting beats on both axes (less leakage and more accuracy, one strictly)."""
    front = []
    for r in rows:
        leak, acc = r.best.leaked_fraction, r.utility.accuracy
        dominated = any(o.best.leaked_fraction <= leak and o.utility.accuracy >= acc
                        and (o.best.leaked_fraction < leak or o.utility.accuracy > acc) for o in rows if o is not r)
        if not dominated:
            front.append(r.defense)
    return front
