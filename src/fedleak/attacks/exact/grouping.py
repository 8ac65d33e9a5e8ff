"""Gradient rows grouped by the input they imply (step 1 of the head attack, algorithms spec §2).

A neuron of the last ReLU layer that fires for one sample only has a gradient row that is a scaled copy of that
sample's input to the layer, so rows that imply the same input belong to one sample. The implied inputs
(:class:`ImpliedInputs`, a row over its bias entry, or over its norm without a bias) are read in float64 a piece
at a time from the gradient as the client sent it: no float64 copy of the layer's rows is held.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from fedleak.attacks.exact.row_span import near_in_span, span_coordinates
from fedleak.nets.float64 import matmul64, rows64

F64 = torch.float64
GROUPING_SEED = 12345
ROW_CHUNK = 256  # rows read at once (a piece stays in cache)
DISTANCE_ROWS = 64  # rows measured at once: their differences from the point (float64) are still in cache when
# their norms read them (2,048 rows of 784: 0.9 against 3.6 ms for 256 rows at once; one thread, Intel Xeon)
HELD_BYTES = 4 << 20  # implied inputs up to this size (float64), or the layer's own, are converted once and held
MANY = 64  # a bucket with more rows than this left after its first group is clustered from a Gram shortlist
SPAN_ROWS = 256  # ... and one of more rows than this from its rows' coordinates on their span, where it is narrow


@dataclass(frozen=True)
class ImpliedInputs:
    """The inputs implied by rows ``idx`` of a layer's weight gradient ``G``: row ``k`` is
    ``G[idx[k]] / divisor[k]`` in float64 (``divisor``: float64, one per row). Without a divisor (:meth:`of`)
    they are the rows of a float64 matrix ``G`` as they are, ``idx`` all of them in order."""

    G: torch.Tensor
    idx: torch.Tensor
    divisor: torch.Tensor | None = None

    @classmethod
    def of(cls, R: torch.Tensor) -> ImpliedInputs:
        """The rows of a matrix as they are (in float64)."""
        return cls(R.to(F64), torch.arange(R.shape[0], device=R.device))

    def held(self) -> tuple[ImpliedInputs, Scan]:
        """The same inputs, converted once and held when they take at most ``HELD_BYTES`` or the layer's own size
        (each later read is then a gather, not a conversion), else ``self``; with their :class:`Scan`, taken while
        each piece is in cache (a held matrix is not read again for it)."""
        if self.divisor is None or 8 * len(self) * self.dim > max(HELD_BYTES, self.G.numel() * self.G.element_size()):
            return self, self.scan()
        out = torch.empty(len(self), self.dim, dtype=F64, device=self.idx.device)
        scan = Scan.empty(len(self), self.dim, out.device)
        for s in range(0, len(self), ROW_CHUNK):  # gathered, converted and divided a piece at a time (in cache)
            piece = out[s : s + ROW_CHUNK]
            piece.copy_(self.G[self.idx[s : s + ROW_CHUNK]])
            piece.div_(self.divisor[s : s + ROW_CHUNK, None])
            scan.add(slice(s, s + len(piece)), piece)
        return ImpliedInputs.of(out), scan.finish()

    def scan(self) -> Scan:
        """The :class:`Scan` of every row, a piece at a time."""
        scan = Scan.empty(len(self), self.dim, self.idx.device)
        for part, rows in self.pieces():
            scan.add(part, rows)
        return scan.finish()

    def __len__(self) -> int:
        return len(self.idx)

    @property
    def dim(self) -> int:
        return self.G.shape[1]

    def rows(self, sel: torch.Tensor) -> torch.Tensor:
        """The implied inputs ``sel`` (indices into ``idx``), float64, a fresh tensor."""
        rows = rows64(self.G, self.idx[sel])
        return rows if self.divisor is None else rows.div_(self.divisor[sel, None])

    def pieces(self, sel: torch.Tensor | None = None, step: int = ROW_CHUNK
               ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(indices, their rows)`` over ``sel`` (all rows by default), ``step`` rows at a time (read only: the
        rows of a held matrix are views of it)."""
        whole = sel is None
        sel = torch.arange(len(self), device=self.idx.device) if whole else sel
        for s in range(0, len(sel), step):
            part = sel[s : s + step]
            yield part, self.G[s : s + step] if whole and self.is_matrix else self.rows(part)

    @property
    def is_matrix(self) -> bool:
        """Whether the inputs are the rows of a float64 matrix as they are, all of them in order (:meth:`of`):
        read without a gather."""
        return self.divisor is None and self.G.dtype == F64 and len(self) == self.G.shape[0]

    def distances(self, sel: torch.Tensor, point: torch.Tensor, which: torch.Tensor | None = None) -> torch.Tensor:
        """``(rows(sel) - point).norm(dim=1)``, a piece at a time; with ``which``, ``point`` holds several points
        (one per row) and row ``k`` is measured from ``point[which[k]]``. Of a matrix's rows, when ``sel`` is most
        of them and the point is one, every row's distance is taken (pieces are views, not gathers) and
        ``sel``'s picked out."""
        step = DISTANCE_ROWS
        if which is None and self.is_matrix and 2 * len(sel) >= len(self):
            every = [torch.linalg.vector_norm(rows - point, dim=1) for _, rows in self.pieces(step=step)]
            return torch.cat(every)[sel]
        out = []
        for s, (_, rows) in zip(range(0, len(sel), step), self.pieces(sel, step)):  # fresh gathers: subtract in place
            out.append(torch.linalg.vector_norm(rows.sub_(point if which is None else point[which[s : s + step]]),
                                                dim=1))
        return torch.cat(out)

    def mean(self, sel: torch.Tensor) -> torch.Tensor:
        """The mean of ``rows(sel)`` (of a matrix's rows, when ``sel`` is most of them: a weighted sum of its
        pieces, which are views, not gathers)."""
        total = torch.zeros(self.dim, dtype=F64, device=self.idx.device)
        if self.is_matrix and 2 * len(sel) >= len(self):
            weight = torch.zeros(len(self), dtype=F64, device=self.idx.device)
            weight[sel] = 1.0
            for part, rows in self.pieces():
                total.addmv_(rows.T, weight[part])
            return total / len(sel)
        for _, rows in self.pieces(sel):
            total += rows.sum(0)
        return total / len(sel)


@functools.lru_cache(maxsize=8)
def scan_directions(dim: int) -> torch.Tensor:
    """Four random unit directions of dimension ``dim`` (rows; float64, CPU, read only), drawn from
    ``GROUPING_SEED``: the same for every call on a model."""
    gen = torch.Generator().manual_seed(GROUPING_SEED)
    V = torch.randn(dim, 4, generator=gen, dtype=F64)
    return (V / V.norm(dim=0, keepdim=True)).T.contiguous()


@dataclass(frozen=True)
class Scan:
    """What grouping reads of every implied input: its norm (at least ``1e-300``) and the projections of its unit
    direction on four random directions (``4 x n``; drawn from ``GROUPING_SEED`` on the CPU, the same on every
    device)."""

    norms: torch.Tensor
    proj: torch.Tensor
    V: torch.Tensor

    @classmethod
    def empty(cls, n: int, dim: int, device) -> Scan:
        V = scan_directions(dim).to(device)
        return cls(torch.empty(n, dtype=F64, device=device), torch.empty(4, n, dtype=F64, device=device), V)

    def add(self, part, rows: torch.Tensor) -> None:
        """Record the rows ``part`` (a slice or indices) from their values ``rows`` (float64)."""
        self.norms[part] = rows.norm(dim=1).clamp_min(1e-300)
        self.proj[:, part] = self.V @ rows.T  # 4 x rows: several times faster than rows @ V.T for BLAS

    def finish(self) -> Scan:
        self.proj.div_(self.norms)
        return self


@dataclass(frozen=True)
class RowGroup:
    """Rows grouped by :func:`group_rows`: their indices, the leader first, then in visiting order, and their
    ``spread``: the largest distance of a row from the leader over the smallest norm of the group's rows (0 for
    a single row). Every two rows of a group lie within ``2 * spread`` of each other, relative to either."""

    rows: list[int]
    spread: float = 0.0


def split_runs(proj: torch.Tensor, gap: float) -> list[torch.Tensor]:
    """Bucket the rows by their projections ``proj`` (one row per projection): runs of rows whose ``proj[0]`` are
    chained within ``gap``, each split again into runs chained within ``gap`` on ``proj[1]``, and so on, so that
    long accidental chains break up. Every run of every level is split at once: rows sorted by (run, projection),
    cut where the run changes or the gap is exceeded."""
    n = proj.shape[1]
    dev = proj.device
    run = torch.zeros(n, dtype=torch.long, device=dev)
    new = torch.ones(n, dtype=torch.bool, device=dev)
    order = torch.arange(n, device=dev)
    for values in proj:
        order = torch.argsort(values, stable=True)
        order = order[torch.argsort(run[order], stable=True)]
        ranked, vals = run[order], values[order]
        new[1:] = (ranked[1:] != ranked[:-1]) | (vals[1:] - vals[:-1] > gap)
        run[order] = torch.cumsum(new, 0) - 1
    return list(order.split(torch.bincount(run).tolist()))


def group_rows(R: ImpliedInputs | torch.Tensor, order: torch.Tensor, tol: float, scan: Scan | None = None
               ) -> list[RowGroup]:
    """Group the implied inputs ``R`` (or the rows of a float64 matrix) that coincide within ``tol`` (relative
    L2); rows are visited in ``order``. ``scan``: ``R``'s :class:`Scan` where it was taken already.

    Rows are bucketed by four random projections of their unit directions (rows within ``tol`` of each
    other stay in one bucket). Within a bucket, leader clustering: the first unassigned row, in ``order``,
    leads its group, and its distances to the bucket's unassigned rows decide the members: to those whose
    projections lie within ``4 tol`` of its own, as every member's do. A bucket is almost always one sample's
    rows, one group; one that still holds more than ``MANY`` rows after its first group (a multi-step weight
    update's rows chain into buckets of hundreds of groups) is clustered by :func:`cluster_bucket`.
    """
    R = R if isinstance(R, ImpliedInputs) else ImpliedInputs.of(R)
    n = len(R)
    if n == 0:
        return []
    dev = R.idx.device
    scan = R.scan() if scan is None else scan
    norms, proj = scan.norms, scan.proj
    rank = torch.empty(n, dtype=torch.long, device=dev)
    rank[order] = torch.arange(n, device=dev)
    groups: list[RowGroup] = []
    runs = split_runs(proj, 4 * tol)
    single = [run for run in runs if len(run) == 1]
    if single:
        groups.extend(RowGroup([row]) for row in torch.cat(single).tolist())
    multi = [run[torch.argsort(rank[run])] for run in runs if len(run) > 1]  # each in visiting order
    if not multi:
        return sort_groups(groups, rank)
    # the unassigned rows of every bucket, bucket by bucket; each round, every bucket's first unassigned row
    # leads a group of the rows within tol of it
    rest = torch.cat(multi)
    bucket = torch.repeat_interleave(torch.arange(len(multi), device=dev),
                                     torch.tensor([len(run) for run in multi], device=dev))
    first_round = True
    while len(rest):
        first = torch.ones(len(rest), dtype=torch.bool, device=dev)
        first[1:] = bucket[1:] != bucket[:-1]
        starts = torch.nonzero(first).flatten()
        pos = torch.cumsum(first, 0) - 1  # each row's bucket among this round's
        leads = rest[starts]
        lead_of = leads[pos]
        # a row within tol of its leader has a unit direction within 2 tol of the leader's, and so has each of its
        # projections: the others are not measured (a bucket of many groups, say of a multi-step weight update's
        # rows, would read all its rows once per group)
        near = torch.nonzero(((proj[:, rest] - proj[:, lead_of]).abs() <= 4 * tol).all(0)).flatten()
        dist = torch.full((len(rest),), math.inf, dtype=F64, device=dev)
        if len(starts) == 1:
            dist[near] = R.distances(rest[near], R.rows(leads)[0])
        else:
            dist[near] = R.distances(rest[near], R.rows(leads), pos[near])
        inside = dist <= tol * torch.maximum(norms[rest], norms[lead_of])
        inside[starts] = True
        owner = pos[inside]
        sizes = torch.bincount(owner, minlength=len(starts))
        far = torch.zeros(len(starts), dtype=F64, device=dev).scatter_reduce_(0, owner, dist[inside], "amax")
        low = torch.full((len(starts),), math.inf, dtype=F64, device=dev).scatter_reduce_(
            0, owner, norms[rest[inside]], "amin")
        spread = torch.where(sizes > 1, far / low, torch.zeros_like(far)).tolist()
        members = rest[inside].split(sizes.tolist())
        groups.extend(RowGroup(rows.tolist(), sp) for rows, sp in zip(members, spread))
        rest, bucket = rest[~inside], bucket[~inside]
        if first_round and len(rest):
            # buckets that still hold many rows hold many groups (a gradient's bucket is one sample's rows): each is
            # clustered on its own, its leaders measuring only the rows a Gram matrix shortlists (the buckets left
            # only shrink, so once is enough)
            left = torch.unique_consecutive(bucket, return_counts=True)
            many = left[0][left[1] > MANY]
            for b in many.tolist():
                groups.extend(cluster_bucket(R, rest[bucket == b], norms, tol))
            if len(many):
                keep = ~torch.isin(bucket, many)
                rest, bucket = rest[keep], bucket[keep]
        first_round = False
    return sort_groups(groups, rank)


def cluster_bucket(R: ImpliedInputs, run: torch.Tensor, norms: torch.Tensor, tol: float) -> list[RowGroup]:
    """Leader clustering of one bucket's rows ``run`` (in visiting order), as :func:`group_rows` does it, for a
    bucket of many groups: the pairs that may lie within ``tol`` are shortlisted (:func:`bucket_shortlist`, a
    superset), and each leader measures its shortlisted unassigned rows only."""
    b = len(run)
    near = bucket_shortlist(R, run, norms, tol)
    np.fill_diagonal(near, False)
    pair_of, partner = np.nonzero(near)  # each row's shortlisted partners, in order
    first = np.searchsorted(pair_of, np.arange(b + 1))
    run_list = run.tolist()
    free = np.ones(b, dtype=bool)
    groups = []
    for k in range(b):
        if not free[k]:
            continue
        others = partner[first[k] : first[k + 1]]
        others = others[free[others]]
        if not len(others):  # no partner left: a group of one row (most rows of a bucket of blends)
            free[k] = False
            groups.append(RowGroup([run_list[k]], 0.0))
            continue
        others = torch.from_numpy(others).to(run.device)
        rows, far, low = run[k : k + 1], 0.0, float(norms[run[k]])
        dist = R.distances(run[others], R.rows(run[k : k + 1])[0])
        inside = dist <= tol * torch.maximum(norms[run[others]], norms[run[k]])
        if bool(inside.any()):
            joined = others[inside]
            free[joined.cpu().numpy()] = False
            rows = torch.cat([rows, run[joined]])
            far, low = float(dist[inside].max()), min(low, float(norms[run[joined]].min()))
        free[k] = False
        groups.append(RowGroup(rows.tolist(), far / low if len(rows) > 1 else 0.0))
    return groups


def bucket_shortlist(R: ImpliedInputs, run: torch.Tensor, norms: torch.Tensor, tol: float) -> np.ndarray:
    """A superset of the pairs of rows ``run`` within ``tol`` of each other (:func:`cluster_bucket`): from their
    coordinates on their span (:func:`~fedleak.attacks.exact.row_span.near_in_span`) for a bucket of more than
    ``SPAN_ROWS`` rows whose span is narrow, else from a Gram matrix of the rows, a piece at a time."""
    b = len(run)
    if b > SPAN_ROWS:
        def pieces():
            return ((s, R.rows(run[s : s + ROW_CHUNK])) for s in range(0, b, ROW_CHUNK))

        coords = span_coordinates(pieces, b, R.dim, max_rank=min(b, R.dim) // 8)
        if coords is not None:
            return near_in_span(coords, norms[run], tol).cpu().numpy()
    near = torch.zeros(b, b, dtype=torch.bool)
    for s in range(0, b, ROW_CHUNK):
        A = R.rows(run[s : s + ROW_CHUNK])
        for t in range(0, s + 1, ROW_CHUNK):  # the blocks on and below the diagonal, mirrored above it
            B = A if t == s else R.rows(run[t : t + ROW_CHUNK])
            block = near_pairs(A, norms[run[s : s + ROW_CHUNK]], tol, B, norms[run[t : t + ROW_CHUNK]]).cpu()
            near[s : s + len(A), t : t + len(B)] = block
            near[t : t + len(B), s : s + len(A)] = block.T
    return near.numpy()


def near_pairs(A: torch.Tensor, a_norms: torch.Tensor, tol: float, B: torch.Tensor | None = None,
               b_norms: torch.Tensor | None = None) -> torch.Tensor:
    """A superset of the pairs of rows of ``A`` and ``B`` (``A`` itself by default; their norms given) within
    ``tol`` times the larger norm of each other, from one product (the squared distances' cancellation error, at
    most ``(d + 4) eps (|a|^2 + |b|^2)``, is added to the bound)."""
    B, b_norms = (A, a_norms) if B is None else (B, b_norms)
    sa, sb = a_norms * a_norms, b_norms * b_norms
    d2 = sa[:, None] + sb[None, :] - 2 * matmul64(A, B.T)  # numpy's BLAS takes ``A A^T`` as one syrk
    slack = 2 * (A.shape[1] + 4) * float(torch.finfo(A.dtype).eps) * (sa[:, None] + sb[None, :])
    return d2 <= (tol * torch.maximum(a_norms[:, None], b_norms[None, :])) ** 2 + slack


def sort_groups(groups: list[RowGroup], rank: torch.Tensor) -> list[RowGroup]:
    """The groups in the visiting order of their leaders."""
    rank_of = rank.tolist()
    return sorted(groups, key=lambda grp: rank_of[grp.rows[0]])
