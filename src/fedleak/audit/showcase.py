"""The report's images of one audited batch: originals, what the client sent and what the attack rebuilt."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedleak.data import Dataset
from fedleak.metrics import MatchResult


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


def withheld_reason(scenario: str) -> str:
    return f"left out of the update by the client ({scenario}): nothing of it can leak, and it trains nothing"


def build_showcase(scenario: str, x: torch.Tensor, y: torch.Tensor, xs: torch.Tensor, rec, scores: MatchResult,
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
    col_reason = [withheld_reason(scenario)] * size + [false_reason[j] for j in extra]
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
