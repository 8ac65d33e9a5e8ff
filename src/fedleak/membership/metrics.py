"""Scoring a membership attack as the field scores it: the ROC curve, its AUC, the balanced accuracy at the best
threshold, and the true-positive rate at a low false-positive rate (1 % and 0.1 %, Carlini et al. 2022).

A score is one number per candidate record, higher meaning "more likely a member"; :func:`score_membership`
turns scores and the truth into a :class:`MembershipMetrics`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fedleak.errors import FedleakError

if TYPE_CHECKING:
    import torch

MAX_CURVE_POINTS = 500


@dataclass(frozen=True)
class MembershipMetrics:
    """How well one attack's scores separate members from non-members.

    ``auc``: area under the ROC curve (the probability that a random member outscores a random non-member,
    ties counting one half); ``balanced_accuracy``: the mean of the true-positive and true-negative rates at the
    best single threshold (0.5 is chance); ``tpr_at_1pct_fpr`` / ``tpr_at_01pct_fpr``: the largest true-positive
    rate on the ROC curve at a false-positive rate of at most 1 % / 0.1 % (0.01 / 0.001 for a random score);
    ``members`` / ``non_members``: how many of each were scored; ``fpr`` / ``tpr``: the ROC curve, down-sampled
    to at most 500 points for plots (starting at (0, 0), ending at (1, 1)).
    """

    auc: float
    balanced_accuracy: float
    tpr_at_1pct_fpr: float
    tpr_at_01pct_fpr: float
    members: int
    non_members: int
    fpr: tuple[float, ...]
    tpr: tuple[float, ...]

    @property
    def advantage(self) -> float:
        """The membership advantage ``2 * balanced_accuracy - 1`` (Yeom et al. 2018): 0 at chance, 1 perfect."""
        return 2.0 * self.balanced_accuracy - 1.0

    def to_dict(self) -> dict:
        return {"auc": self.auc, "balanced_accuracy": self.balanced_accuracy,
                "tpr_at_1pct_fpr": self.tpr_at_1pct_fpr, "tpr_at_01pct_fpr": self.tpr_at_01pct_fpr,
                "members": self.members, "non_members": self.non_members,
                "fpr": list(self.fpr), "tpr": list(self.tpr)}


def _as_array(values: object, name: str) -> np.ndarray:
    try:
        import torch

        if isinstance(values, torch.Tensor):
            values = values.detach().cpu().double().numpy() if values.dtype != torch.bool else values.cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    array = np.asarray(values)
    if array.ndim != 1:
        raise FedleakError(f"{name} must be one-dimensional (one value per record), got shape {array.shape}")
    return array


def _member_mask(is_member: object) -> np.ndarray:
    truth = _as_array(is_member, "is_member")
    if truth.dtype == bool:
        return truth
    if not np.issubdtype(truth.dtype, np.number) or not np.isin(truth, (0, 1)).all():
        raise FedleakError("is_member must hold booleans or 0/1 values (1: the record was a training member)")
    return truth.astype(bool)


def roc_points(scores: np.ndarray, member: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ROC curve at every distinct threshold: ``(fpr, tpr)`` from (0, 0) to (1, 1); records with equal scores
    cross a threshold together, so ties give one point, never a staircase that depends on their order."""
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, sorted_member = scores[order], member[order]
    last_of_value = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1]
    tp = np.cumsum(sorted_member)[last_of_value]
    fp = (last_of_value + 1) - tp
    positives, negatives = member.sum(), member.size - member.sum()
    return np.r_[0.0, fp / negatives], np.r_[0.0, tp / positives]


def mann_whitney_auc(scores: np.ndarray, member: np.ndarray) -> float:
    """AUC as the Mann-Whitney U statistic over average ranks (ties count one half)."""
    from scipy.stats import rankdata

    ranks = rankdata(scores, method="average")
    positives = int(member.sum())
    negatives = member.size - positives
    u = ranks[member].sum() - positives * (positives + 1) / 2.0
    return float(u / (positives * negatives))


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, limit: float) -> float:
    """The largest TPR among ROC points with FPR <= ``limit`` (the field's reading; 0 if none but the origin)."""
    return float(tpr[fpr <= limit + 1e-12].max())


def downsample_curve(fpr: np.ndarray, tpr: np.ndarray, points: int = MAX_CURVE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """At most ``points`` ROC points for plots: half evenly spaced along the curve, half at log-spaced FPRs (so a
    log-scale plot keeps its low-FPR end), the first and last always kept."""
    if fpr.size <= points:
        return fpr, tpr
    even = np.linspace(0, fpr.size - 1, points // 2).round().astype(int)
    smallest = max(float(fpr[fpr > 0].min()), 1e-6)
    targets = np.geomspace(smallest, 1.0, points - points // 2 - 2)
    logged = np.searchsorted(fpr, targets, side="right") - 1
    keep = np.unique(np.r_[0, even, logged.clip(0, fpr.size - 1), fpr.size - 1])
    return fpr[keep], tpr[keep]


def score_membership(scores: torch.Tensor | np.ndarray, is_member: torch.Tensor | np.ndarray) -> MembershipMetrics:
    """Score membership guesses: ``scores`` one number per record (higher: more likely a member), ``is_member``
    the truth (booleans or 0/1), both one-dimensional of the same length.

    The ROC curve is taken at every distinct score (ties handled as one threshold), the AUC is the Mann-Whitney
    statistic, the balanced accuracy is that of the best threshold, and TPR at 1 % and 0.1 % FPR are read from
    the curve as the largest TPR with FPR at most that rate.

    How many non-members that needs: a TPR at FPR <= 1 % means something only with at least 100 non-members (one
    false positive is then 1 %), and at 0.1 % with at least 1,000; with fewer, the figure is the TPR at zero false
    positives. Likewise the AUC's standard error is about ``0.3 / sqrt(min(members, non_members))`` near 0.5.

    Raises :class:`~fedleak.errors.FedleakError` if the lengths differ, a value is NaN or infinite, or only one
    class (members or non-members) is present.
    """
    values = _as_array(scores, "scores")
    member = _member_mask(is_member)
    if values.size != member.size:
        raise FedleakError(f"scores has {values.size} value(s) but is_member has {member.size}; "
                           "give one score per record")
    if not np.issubdtype(values.dtype, np.number) or values.dtype == bool:
        raise FedleakError(f"scores must be real numbers, got dtype {values.dtype}")
    values = values.astype(np.float64)
    if not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).sum())
        raise FedleakError(f"scores holds {bad} NaN or infinite value(s); every record needs a finite score")
    positives = int(member.sum())
    if positives == 0 or positives == member.size:
        present = "members" if positives else "non-members"
        raise FedleakError(f"is_member holds only {present} ({member.size} record(s)); scoring needs both "
                           "members and non-members")
    fpr, tpr = roc_points(values, member)
    balanced = float(((tpr + 1.0 - fpr) / 2.0).max())
    curve_fpr, curve_tpr = downsample_curve(fpr, tpr)
    return MembershipMetrics(
        auc=mann_whitney_auc(values, member), balanced_accuracy=balanced,
        tpr_at_1pct_fpr=tpr_at_fpr(fpr, tpr, 0.01), tpr_at_01pct_fpr=tpr_at_fpr(fpr, tpr, 0.001),
        members=positives, non_members=member.size - positives,
        fpr=tuple(float(v) for v in curve_fpr), tpr=tuple(float(v) for v in curve_tpr))
