"""The complete candidates' float64 traces, as the certificate reads them: a block of candidates at a time.

The certificate reads each candidate's float64 trace (its activations and backward signals at every layer of the
head, :func:`fedleak.nets.forward_trace`). On two-class data hundreds of candidates are blends of samples, and
their traces together can hold several times the update's size. Where they fit in ``KEEP_SHARE`` times the
update's size, they are made once and kept; otherwise a block of candidates at a time, each time they are read
(twice in all: for the witness fits, then for what the certificate reads across candidates and to keep the
candidates the joint tests take), so that the attack's memory follows the update's size, not the number of
blends.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from fedleak.nets import Trace, forward_trace
from fedleak.nets.float64 import linear64

F64 = torch.float64
R = TypeVar("R")
KEEP_SHARE = 2.0  # the candidates' traces are made once and kept up to this many times the update's size; ...
BLOCK_SHARE = 1.0  # ... beyond, in blocks of at most this many times its size, ...
MIN_BLOCK = 32  # ... of at least this many candidates
FIRST_ROWS = 64  # candidates whose first-layer pre-activations are computed at once


class CandidateTraces:
    """The float64 traces of the complete candidates ``complete`` (their inputs ``X``, labels ``y``), in blocks
    (:attr:`blocks`, ranges of their numbers), read by :meth:`read`. The first reading starts from the
    first-layer pre-activations the top layer's check kept (and releases them)."""

    def __init__(self, attack, complete: list, X: torch.Tensor, y: torch.Tensor):
        self.attack, self.complete, self.X, self.y = attack, complete, X, y
        widths = attack.net.widths
        # float64 input, activations and backward signals, plus the client's replay (its dtype) of the activations
        per_candidate = 8 * (X.shape[1] + 2 * sum(widths)) + attack.obs_dtype.itemsize * sum(widths)
        n, size = len(complete), attack.update_size()
        if n * per_candidate <= KEEP_SHARE * size:
            rows = max(n, 1)
        else:
            rows = max(MIN_BLOCK, int(BLOCK_SHARE * size / per_candidate))
        self.blocks = [range(s, min(s + rows, n)) for s in range(0, n, rows)]
        self.kept: Trace | None = None

    def read(self, fn: Callable[[range, Trace], R]) -> list[R]:
        """``fn(block, its trace)`` for every block, in order: each block's trace is made just before (kept where
        there is one block) and held no longer than ``fn`` holds it."""
        out = [fn(block, self.kept if self.kept is not None else self.trace(block)) for block in self.blocks]
        for c in self.complete:  # the first-layer pre-activations the top layer's check kept are read no more
            c.first = None
        return out

    def trace(self, block: range) -> Trace:
        """The trace of the candidates of ``block`` (without pre-activations: the activations give the same ReLU
        masks)."""
        X = self.X[block.start : block.stop]
        first = first_layer(self.attack, X, self.complete[block.start : block.stop])
        trace = forward_trace(self.attack.net, X, self.y[block.start : block.stop], dtype=F64,
                              params=(self.attack.W, self.attack.b), first=first,
                              smoothing=self.attack.opts.smoothing, keep_pre=False,
                              focal_gamma=self.attack.opts.focal_gamma)
        if len(self.blocks) == 1:
            self.kept = trace
        return trace


def join(parts: list[Trace]) -> Trace:
    """One trace of the samples of ``parts`` (traces of the same network, with labels), in their order."""
    if len(parts) == 1:
        return parts[0]
    return Trace([torch.cat(a) for a in zip(*(p.activations for p in parts))], [],
                 torch.cat([p.logits for p in parts]), torch.cat([p.loss_vectors for p in parts]),
                 [torch.cat(d) for d in zip(*(p.deltas for p in parts))])


def first_layer(attack, X: torch.Tensor, complete: list) -> torch.Tensor | None:
    """The first layer's float64 pre-activations of the candidates' inputs ``X``: the top-layer check's where
    it kept them (:attr:`~fedleak.attacks.exact.candidates.Candidate.first_pre`), the others computed here
    (None when it kept none: the forward pass computes them all)."""
    firsts = [c.first_pre for c in complete]
    missing = [k for k, z in enumerate(firsts) if z is None]
    if len(missing) == len(firsts):
        return None
    out = torch.empty(len(firsts), attack.W[0].shape[0], dtype=F64, device=X.device)
    for k, row in enumerate(firsts):
        if row is not None:
            out[k] = row
    W, b = attack.W[0], attack.b[0]
    for s in range(0, len(missing), FIRST_ROWS):  # a block of rows at a time: no second array of the layer's size
        rows = missing[s : s + FIRST_ROWS]
        z = linear64(X[rows], W)
        out[rows] = z if b is None else z + b
    return out
