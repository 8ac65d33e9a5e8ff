"""Label smoothing read off the update: where nothing is certified as the gradient of a plain cross-entropy, the
rows may still be those of a cross-entropy with label smoothing ``s`` (``F.cross_entropy(...,
label_smoothing=s)``), whose loss vectors are ``p - (1 - s) onehot(y) - s/K``.

A row exclusive to one sample implies that sample's input to the layer (its gradient row over its bias
gradient), whose forward pass gives ``p``; the row's output-layer column is then ``alpha (p - s/K)`` on every
entry but the label's. Off each entry in turn the column is fitted as ``alpha p + beta`` (so ``s = -K beta /
alpha``); the label is the entry whose omission leaves a fit within the candidate check's tolerance (the label's
own entry then follows: every loss vector sums to 0). That takes ``K >= 4``: with ``K - 1`` entries left for
the fit's two numbers, three at least, a wrong label or ``s`` leaves a residual. A row where more than one entry's
omission fits is not read: a column that reduces to ``alpha onehot(prediction) + beta`` (a saturated sample
predicting its label, or one whose other probabilities are all equal) fits off every entry but the
prediction's, each with another ``s``. The update is read as label-smoothed where most rows
read, and at least three, agree on ``s`` (a sample's exclusive rows agree exactly; blends of samples fit no
common ``s``). The rows read are those whose columns are parallel to another row's (found by sorting the
columns' directions along a random one): a sample's exclusive rows share its loss vector's direction, a blend's
column mixes several. The attack then runs again with it and certifies as it always does: the certificate
recomputes every sample's gradient with that loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedleak.attacks.exact.candidates import tail_forward
from fedleak.nets.float64 import rows64

F64 = torch.float64
ROWS = 64  # at most this many of the last ReLU layer's rows are read (the strongest of those with a parallel
PARALLEL = 1e-5  # column): columns whose directions lie within this (unit vectors' distance) are parallel
AGREE = 1e-4  # two rows agree on s to within this
STEP = 1e-3  # a value of s within AGREE of a multiple of this is read as that multiple (0.1, not 0.09999)
MIN_ROWS = 3  # rows that must agree on s (and at least half of the rows read)
CERTAIN = 1e-3  # values of s within this of 1 are not read (no client smooths its labels that far)


@dataclass(frozen=True)
class SmoothingReading:
    """The label smoothing read off the update: its ``value`` and how many rows agreed on it."""

    value: float
    rows: int

    def note(self, certified: bool = True) -> str:
        """What the result's notes say: the update was read with it, or (``certified=False``) it was read off the
        update but nothing was certified with it either."""
        if not certified:
            return (f"{self.rows} rows of the last ReLU layer and their output-layer columns fit a cross-entropy with "
                    f"label smoothing {self.value:g}; read with it, nothing was certified either")
        return (f"read as the gradient of a cross-entropy with label smoothing {self.value:g}, which {self.rows} rows "
                f"of the last ReLU layer and their output-layer columns fit (pass label_smoothing=0 to read it as a "
                f"plain cross-entropy)")


def read_label_smoothing(attack) -> SmoothingReading | None:
    """The label smoothing the last ReLU layer's strongest rows agree on (module docstring): the largest cluster of
    the rows' values, where it holds ``MIN_ROWS`` rows and half of the rows read; None where there is none, where
    the layer has no bias, or where the model has fewer than four classes (two classes: every loss vector is a
    multiple of ``(1, -1)``, whatever ``s``; three: every row fits some ``s`` off each of its entries)."""
    t = attack.net.depth - 1
    g, col = attack.g[t], attack.G[-1]
    K = col.shape[0]
    if g is None or K < 4:
        return None
    rows = parallel_rows(col, torch.nonzero(g != 0).flatten())
    rows = rows[torch.argsort(-g[rows].abs())[:ROWS]]
    if len(rows) < 2:
        return None
    # the rows' inputs forwarded in the weights' own dtype: the reading is a screen (the certificate that follows
    # recomputes everything in float64), and float32's rounding is far below the tolerances it reads with
    X = rows64(attack.G[t], rows) / g[rows].to(F64)[:, None]
    _, _, logits = tail_forward(attack.net, attack.W, attack.b, t, X.to(attack.W[t].dtype))
    p = torch.softmax(logits.to(F64), dim=1)
    c = col[:, rows].T.to(F64)
    values = row_values(c, p, attack.opts.top_tol, float(torch.finfo(col.dtype).eps))
    values = values[torch.isfinite(values)].sort().values
    if len(values) < MIN_ROWS:
        return None
    # the largest cluster of values within 2 AGREE: a sample's exclusive rows, of every sample, agree on s
    ends = torch.searchsorted(values, values + 2 * AGREE, right=True)
    start = int((ends - torch.arange(len(values), device=values.device)).argmax())
    cluster = values[start : int(ends[start])]
    if len(cluster) < max(MIN_ROWS, (len(values) + 1) // 2):
        return None
    value = float(cluster.median())
    nearest = round(round(value / STEP) * STEP, 6)
    value = nearest if abs(value - nearest) <= AGREE and 0 < nearest < 1 else value
    if value <= 2 * AGREE:  # a plain cross-entropy's rows read s = 0, up to their rounding
        return None
    return SmoothingReading(value, len(cluster))


def parallel_rows(col: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The rows among ``rows`` whose output-layer columns (of ``col``, K x width) are parallel to another one's:
    neighbours once sorted by their unit columns' projection on a fixed random direction."""
    c = col[:, rows].T.to(F64)
    norm = c.norm(dim=1)
    rows, c = rows[norm > 0], c[norm > 0] / norm[norm > 0, None]
    if len(rows) < 2:
        return rows
    direction = torch.randn(c.shape[1], dtype=F64, generator=torch.Generator().manual_seed(0)).to(c.device)
    order = torch.argsort(c @ direction)
    close = (c[order[1:]] - c[order[:-1]]).norm(dim=1) <= PARALLEL
    mark = torch.zeros(len(rows), dtype=torch.bool, device=c.device)
    mark[order[1:][close]] = True
    mark[order[:-1][close]] = True
    return rows[mark]


def row_values(c: torch.Tensor, p: torch.Tensor, tol: float, eps: float) -> torch.Tensor:
    """Each row's label smoothing (NaN where none is read): columns ``c`` and predicted probabilities ``p``
    (rows x K, float64) fitted as ``alpha p + beta`` off each entry in turn, read where exactly one entry's
    omission fits (module docstring); ``eps``: the columns' relative rounding."""
    K = c.shape[1]
    # the normal equations of the fit off each entry y (rows x K): sums over all entries less entry y's term
    suu = (p * p).sum(1, keepdim=True) - p * p
    su = p.sum(1, keepdim=True) - p
    sw = K - 1.0
    scu = (c * p).sum(1, keepdim=True) - c * p
    sc = c.sum(1, keepdim=True) - c
    scc = (c * c).sum(1, keepdim=True) - c * c
    det = suu * sw - su * su
    alpha = (scu * sw - su * sc) / det
    beta = (suu * sc - su * scu) / det
    res = (scc - alpha * scu - beta * sc).clamp_min(0) / scc.clamp_min(1e-300)
    value = -K * beta / alpha
    # alpha p must vary off the label by well above the columns' rounding (a saturated sample's p_c are about 0)
    spread = alpha * (det.clamp_min(0) / sw).sqrt()
    ok = (det > 0) & (alpha > 0) & (scc > 0) & (spread >= 1e3 * eps * scc.sqrt()) & (res.sqrt() <= tol)
    ok &= (value > 0) & (value < 1 - CERTAIN)
    # the label: the one entry whose omission fits (two would leave s unknown)
    fits = ok.sum(1) == 1
    best = torch.where(ok, res, torch.full_like(res, float("inf"))).argmin(1, keepdim=True)
    read = value.gather(1, best)[:, 0]
    return torch.where(fits, read, torch.full_like(read, float("nan")))
