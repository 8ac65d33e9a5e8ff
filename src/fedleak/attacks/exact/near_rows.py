"""First-layer rows that read almost a rebuilt input: where they disagree with it beyond the update's rounding, the
input is not known to that rounding.

A weight update's certificate bounds how far the client's rounding can have moved a rebuilt input from the ratio
``G_j / g_j`` of its witness rows. That bound assumes the rows are the sample's alone. On a trained model, a sample
the model classifies with near certainty has a near-zero loss vector: a row it shares with another sample reads
that sample's input, off by its own tiny share, passes the witness fit within the rounding, and can pull the rebuilt
input off the true one by more than the exactness tolerance, while the rows the sample does hold alone disagree
with it. Those rows agree with each other within their rounding, as a shared row whose other sample's share differs
from row to row does not: every row whose ratio lies within :data:`NEAR` of the data range's width from the rebuilt
input is read, and where two of them disagree with it beyond their rounding bounds but agree with each other, the
input is uncertain by at least their disagreement (which of the two is the sample's cannot be told).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedleak.attacks.exact.noise import RoundingNoise
from fedleak.nets.float64 import piece_rows, rows64

F64 = torch.float64
NEAR = 0.01  # rows whose ratio is this close to the rebuilt input (max abs, of the range's width) are read
# the client's own float32 rounding of the gradient (a few operations per entry), in epsilons of |x|
GRADIENT_EPSILONS = 16
MAX_RIVAL_ROWS = 128  # disagreeing rows compared pairwise, the largest bias changes first
SCREEN_BLOCK = 64  # rebuilt inputs screened by one product (Screens)


@dataclass(frozen=True, eq=False)
class NearRows:
    """What the test reads of a weight update's first dense layer, once per attack: the weight rows ``G`` (the
    client's dtype), the bias changes ``g`` and their rounding ``nb`` (float64), the weights' rounding ``noise``,
    each row's ratio norm ``||G_j|| / |g_j|`` and the ``live`` rows (a bias change beyond its rounding)."""

    G: torch.Tensor
    g: torch.Tensor
    nb: torch.Tensor
    noise: RoundingNoise
    scale: torch.Tensor
    live: torch.Tensor

    @classmethod
    def of(cls, attack) -> NearRows | None:
        """The attack's first layer as the test reads it; None where no rounding bound is known (a gradient) or
        the first layer has no bias."""
        if attack.noise is None or attack.g[0] is None:
            return None
        g, nb = attack.g[0], attack.noise_b[0]
        return cls(attack.G[0], g, nb, attack.noise[0], attack.row_norms(0) / g.abs().clamp_min(1e-300),
                   g.abs() > nb)

    def rival(self, x: torch.Tensor, width: float, limit: float, screen: torch.Tensor | None = None) -> float:
        """How far a rival to the rebuilt input ``x`` (flat) lies from it beyond the rounding, where that is more
        than ``limit`` (else 0): two or more rows within ``NEAR * width`` of ``x`` that disagree with it beyond their
        rounding bound and agree with each other within theirs (max abs over the values where both disagree).
        ``screen``: ``G @ x`` in the gradient's dtype, where it was taken (:class:`Screens`)."""
        G, g = self.G, self.g
        x = x.to(device=g.device, dtype=F64).reshape(-1)
        # the rows within NEAR (max abs) are within NEAR sqrt(D) in L2: screened by one product in the gradient's
        # dtype, whose rounding (at most D eps ||G_j|| ||x|| per dot, in any order of the sum) widens the screen
        d, eps, norm = x.numel(), float(torch.finfo(G.dtype).eps), float(x.norm())
        if screen is None:
            screen = torch.mv(G, x.to(G.dtype))
        sq = self.scale.square() - 2 * screen.to(F64) / g + norm * norm
        rows = torch.nonzero(self.live & (sq <= (NEAR * width) ** 2 * d + 4 * d * eps * self.scale * norm)).flatten()
        slack = GRADIENT_EPSILONS * float(torch.finfo(torch.float32).eps) * x.abs()
        # the rows within NEAR that disagree with x by more than limit (a pair of rows disagrees by more than limit
        # only where each row does), read a piece at a time: the screen may pass most of the layer
        off, step = [], piece_rows(*G.shape, 0)
        for s in range(0, len(rows), step):
            ratios, _, excess = self.read(rows[s : s + step], x, slack)
            near = (ratios - x).abs().amax(1) <= NEAR * width
            off.append(rows[s : s + step][near & (excess.amax(1) > limit)])
        rows = torch.cat(off)
        if len(rows) < 2:
            return 0.0
        rows = rows[torch.argsort(g[rows].abs(), descending=True)[:MAX_RIVAL_ROWS]]  # the most precise rows first
        ratios, bound, excess = self.read(rows, x, slack)
        worst = 0.0
        for j in range(len(ratios) - 1):
            agree = ((ratios[j + 1:] - ratios[j]).abs() <= bound[j + 1:] + bound[j]).all(1)
            if bool(agree.any()):
                worst = max(worst, float(torch.minimum(excess[j + 1:][agree], excess[j][None]).max()))
        return worst if worst > limit else 0.0

    def read(self, rows: torch.Tensor, x: torch.Tensor, slack: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows ``rows``' ratios, their rounding bounds (plus ``slack``) and their disagreement with ``x`` beyond
        the bounds (float64)."""
        g, nb = self.g[rows], self.nb[rows]
        ratios = rows64(self.G, rows) / g[:, None]
        bound = (self.noise.rows(rows) + x.abs()[None] * nb[:, None]) / (g.abs() - nb)[:, None] + slack
        return ratios, bound, (ratios - x).abs() - bound  # > 0 where a row disagrees with x beyond its rounding


class Screens:
    """The rival-row screen's products ``G @ x`` of rebuilt inputs ``X`` (one flat input per row) a certificate
    reads, taken ``SCREEN_BLOCK`` inputs at a time in one product (one product per input reads ``G`` once each)
    when one of them is first read; the last block is kept."""

    def __init__(self, rows: NearRows, X: torch.Tensor):
        self.rows, self.X = rows, X.reshape(len(X), -1)
        self.block: tuple[int, torch.Tensor] | None = None

    def of(self, j: int) -> torch.Tensor:
        """Input ``j``'s products."""
        start = j - j % SCREEN_BLOCK
        if self.block is None or self.block[0] != start:
            X = self.X[start : start + SCREEN_BLOCK].to(device=self.rows.G.device, dtype=self.rows.G.dtype)
            self.block = (start, self.rows.G @ X.T)
        return self.block[1][:, j - start]
