"""score_membership against hand-computed cases and scikit-learn's ROC AUC."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedleak.errors import FedleakError
from fedleak.membership import score_membership


def test_hand_computed_case_with_a_tie() -> None:
    # members 3, 2; non-members 2, 1, 0: one member-non-member tie counts one half
    m = score_membership(np.array([3.0, 2.0, 2.0, 1.0, 0.0]), np.array([1, 1, 0, 0, 0]))
    assert m.auc == pytest.approx((3 + 2.5) / 6)
    assert m.members == 2 and m.non_members == 3
    # thresholds: >3 (0,0), >=3 (0, .5), >=2 (1/3, 1): tied records cross together
    assert m.fpr == pytest.approx((0.0, 0.0, 1 / 3, 2 / 3, 1.0))
    assert m.tpr == pytest.approx((0.0, 0.5, 1.0, 1.0, 1.0))
    assert m.balanced_accuracy == pytest.approx((1.0 + 2 / 3) / 2)
    assert m.tpr_at_1pct_fpr == pytest.approx(0.5) and m.tpr_at_01pct_fpr == pytest.approx(0.5)


def test_perfect_and_reversed_scores() -> None:
    truth = torch.tensor([True] * 5 + [False] * 5)
    perfect = score_membership(torch.arange(10, 0, -1).float(), truth)
    assert perfect.auc == 1.0 and perfect.balanced_accuracy == 1.0 and perfect.tpr_at_01pct_fpr == 1.0
    reverse = score_membership(torch.arange(10).float(), truth)
    assert reverse.auc == 0.0 and reverse.tpr_at_1pct_fpr == 0.0


def test_all_scores_tied_is_chance() -> None:
    m = score_membership(np.zeros(8), np.array([1, 0] * 4))
    assert m.auc == 0.5 and m.balanced_accuracy == 0.5 and m.tpr_at_1pct_fpr == 0.0


def test_matches_sklearn_and_reads_low_fpr() -> None:
    from sklearn.metrics import roc_auc_score, roc_curve

    rng = np.random.default_rng(0)
    truth = rng.random(3000) < 0.4
    scores = np.round(rng.normal(truth * 0.7, 1.0), 1)  # rounding makes many ties
    m = score_membership(scores, truth)
    assert m.auc == pytest.approx(roc_auc_score(truth, scores), abs=1e-12)
    fpr, tpr, _ = roc_curve(truth, scores)
    assert m.tpr_at_1pct_fpr == pytest.approx(tpr[fpr <= 0.01].max())
    assert m.balanced_accuracy == pytest.approx(((tpr + 1 - fpr) / 2).max())
    assert len(m.fpr) <= 500 and m.fpr[0] == 0.0 and m.fpr[-1] == 1.0 and m.tpr[-1] == 1.0


def test_curve_is_downsampled_to_at_most_500_points() -> None:
    rng = np.random.default_rng(1)
    truth = rng.random(5000) < 0.5
    m = score_membership(rng.normal(truth, 1.0), truth)
    assert 100 < len(m.fpr) <= 500 and np.all(np.diff(m.fpr) >= 0) and np.all(np.diff(m.tpr) >= 0)
    assert m.to_dict()["auc"] == m.auc


@pytest.mark.parametrize("scores, truth, message", [
    (np.ones(3), np.array([1, 0]), "3 value"),
    (np.ones(3), np.array([1, 1, 1]), "only members"),
    (np.ones(3), np.array([0, 0, 0]), "only non-members"),
    (np.array([1.0, np.nan, 0.0]), np.array([1, 0, 0]), "NaN"),
    (np.ones((2, 2)), np.array([1, 0]), "one-dimensional"),
    (np.ones(2), np.array([2, 0]), "0/1"),
])
def test_bad_input(scores, truth, message) -> None:
    with pytest.raises(FedleakError, match=message):
        score_membership(scores, truth)
