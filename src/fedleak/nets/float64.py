"""A layer's matrix (an observed gradient, a model's weights) read in float64 a piece at a time.

The exact attack keeps the observed gradient in the dtype the client sent and the model's weights in the model's
own (float32, usually): a float64 copy of a whole layer would double the memory each takes. Every value is read in
float64, which holds float32 values exactly (one exception: the joint test's random sketch of a float32 layer,
:func:`product32`): rows gathered from a layer are converted after the gather
(:func:`rows64`), and whole-layer reductions and products (:func:`times64`, :func:`linear64`, :func:`back64`)
convert a piece of rows at a time into one reused buffer (:func:`pieces64`; a fresh buffer per piece costs more
in page faults than the conversion itself on a 25088-wide layer). A float64 matrix is used as it is.

On the CPU a float64 product goes through numpy's BLAS or torch's, whichever :mod:`fedleak.nets.blas` found faster
on this CPU (a Gram product ``A A^T`` always through numpy's, which takes it as one ``syrk``). Tensors that take
part in autograd stay with torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from fedleak.nets.blas import ieee_float32_matmul, torch_blas_preferred

F64 = torch.float64
EPS64 = float(torch.finfo(F64).eps)
PIECE_ENTRIES = 1 << 19  # float64 entries of a layer converted at once (4 MiB), at most an eighth of the layer ...
PIECE_ROWS = 128  # ... or this many rows of a wide layer (a product then reads its other factor fewer times)
WIDE = PIECE_ENTRIES // PIECE_ROWS  # a layer this wide is read PIECE_ROWS rows at a time
NARROW = 16  # a reduction, or a product with at most this many columns, reads pieces of ...
NARROW_ENTRIES = 1 << 16  # ... at most this many float64 entries (512 KiB) and PIECE_ENTRIES / columns: the piece
# is still in cache when it is read ...
NARROW_COLS = 2 * WIDE  # ... of a layer at most this wide (a row of a wider one is most of that already)
TORCH_PIECE_ENTRIES = 1 << 17  # float64 entries of a layer in one product on torch's BLAS (1 MiB)
FLAT_PIECE = 1 << 15  # entries of a flat vector read in float64 at once (256 KiB: still in cache when read)


def rows64(G: torch.Tensor, rows) -> torch.Tensor:
    """``G[rows]`` in float64."""
    return G[rows].to(F64)


def pieces64(G: torch.Tensor, width: int = 0) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, G[start:start + n] in float64)`` over ``G``'s rows, a piece at a time (the pieces share one
    buffer: use each before asking for the next); ``width``: the columns of the other factor of the product the
    pieces go into (0: a reduction), which sets their size (:func:`piece_rows`)."""
    if G.dtype == F64:
        yield 0, G
        return
    step = piece_rows(*G.shape, width)
    buffer = torch.empty(min(step, G.shape[0]), G.shape[1], dtype=F64, device=G.device)
    for s in range(0, G.shape[0], step):
        piece = buffer[: min(step, G.shape[0] - s)]
        piece.copy_(G[s : s + step])
        yield s, piece


def piece_rows(rows: int, cols: int, width: int = NARROW + 1) -> int:
    """How many rows of a ``rows x cols`` layer :func:`pieces64` converts at once for a product with ``width``
    columns (0: a reduction): at most ``PIECE_ENTRIES`` entries and an eighth of the layer (the buffer stays small
    next to the layer itself), but ``PIECE_ROWS`` rows of a wide layer, and at least 16. A reduction, or a product
    of at most ``NARROW`` columns on numpy's BLAS, reads at most ``NARROW_ENTRIES`` and ``PIECE_ENTRIES / width``
    entries at a time (at least 8 rows): converted and read while in cache, the pieces cost up to half as much as
    larger ones (a 4096 x 784 float32 layer's row norms: 1.5 against 2.8 ms; its product with 16 columns: 3.6
    against 5.0 ms; one thread, Intel Xeon with AVX-512, torch 2.13.0, numpy's OpenBLAS), where a wider product
    gains from reading its other factor fewer times. A product on torch's BLAS (MKL, which costs more per call)
    reads ``TORCH_PIECE_ENTRIES`` at a time, whatever its width (that layer times 16 columns: 2.5 against 3.1 ms
    in the pieces for numpy's BLAS; times 1 to 256 columns no slower)."""
    if 0 < width and cols < WIDE and torch_blas_preferred():
        return max(8, min(TORCH_PIECE_ENTRIES // max(cols, 1), -(-rows // 8)))
    if width <= NARROW and cols <= NARROW_COLS:
        entries = min(NARROW_ENTRIES, PIECE_ENTRIES // max(width, 1))
        return max(8, min(entries // max(cols, 1), -(-rows // 8)))
    if cols >= WIDE:
        return PIECE_ROWS
    return max(16, min(PIECE_ENTRIES // max(cols, 1), -(-rows // 8)))


def flat_pieces64(*vectors: torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
    """The float64 pieces of flat vectors of one length, ``FLAT_PIECE`` entries at a time, each vector's copied into
    a buffer of its own (use them before asking for the next; they may be changed in place)."""
    n = vectors[0].numel()
    buffers = [torch.empty(min(FLAT_PIECE, n), dtype=F64, device=v.device) for v in vectors]
    for s in range(0, n, FLAT_PIECE):
        e = min(s + FLAT_PIECE, n)
        yield tuple(b[: e - s].copy_(v[s:e]) for v, b in zip(vectors, buffers))


def dot64(a: torch.Tensor, b: torch.Tensor) -> float:
    """``a . b`` of two flat vectors in float64 (products of float32 values exact), without a float64 copy of either;
    ``a . a`` reads ``a`` once."""
    if a is b:
        return sum(float(torch.dot(p, p)) for p, in flat_pieces64(a))
    return sum(float(torch.dot(p, q)) for p, q in flat_pieces64(a, b))


@dataclass(frozen=True)
class FitProducts:
    """The float64 products of one pass over two flat vectors ``t`` and ``g`` at a trial scale ``s0``: ``tt = t.t``,
    ``tg = t.g``, ``gg = g.g``, ``rr = ||r||^2`` and ``rg = r.g`` for ``r = t - s0 g`` (each entry of ``r`` computed
    in float64, as :func:`misfit64` computes it), and the vectors' length ``n``."""

    tt: float
    tg: float
    gg: float
    rr: float
    rg: float
    n: int

    def misfit(self, s0: float, scale: float) -> float:
        """An upper bound on ``||t - scale g||`` from the products alone: ``||r - d g||^2 = rr - 2 d rg + d^2 gg``
        with ``d = scale - s0`` (no cancellation where ``d`` is small: ``r`` is then the residual but for ``d g``),
        plus that sum's float64 rounding: ``rr``, ``rg`` and ``gg`` are sums of ``n`` products, each sum off by at
        most ``gamma_n`` of the sum of their magnitudes (``sum |r_i g_i| <= ||r|| ||g||``); each entry of ``r`` is
        off by at most ``u (|s0 g_i| + |r_i|)``, and ``scale`` by ``u |scale|`` from ``s0 + d``."""
        u = EPS64 / 2
        gamma = self.n * u / (1 - self.n * u)
        nr, ng = math.sqrt(max(self.rr, 0.0)), math.sqrt(self.gg)
        d = scale - s0
        squared = self.rr - 2 * d * self.rg + d * d * self.gg
        err = gamma * nr * nr + 2 * abs(d) * (gamma * nr * ng + u * (abs(s0) * ng + nr) * ng) + d * d * gamma * ng * ng
        return math.sqrt(max(squared + err, 0.0)) + u * ((abs(s0) + abs(scale)) * ng + nr)


def fit_products64(t: torch.Tensor, g: torch.Tensor, s0: float) -> FitProducts:
    """:class:`FitProducts` of two flat vectors at the trial scale ``s0``, in one float64 pass that converts each
    piece of either vector once (:func:`flat_pieces64`): the products a least-squares scale and its residual need,
    where a fit over the vectors' dot products and a second pass for the residual read ``g`` three times. The pass
    sums ``tt``, ``gg``, ``rr`` and ``rg``; ``tg = rg + s0 gg`` follows (``t = r + s0 g``), to float64 rounding of
    its terms: a fit's scale, at which the residual is then taken (any scale gives a true residual)."""
    tt = gg = rr = rg = 0.0
    for p, q in flat_pieces64(t, g):
        tt += float(torch.dot(p, p))
        gg += float(torch.dot(q, q))
        r = p.sub_(q, alpha=s0) if s0 else p
        rr += float(torch.dot(r, r))
        rg += float(torch.dot(r, q))
    return FitProducts(tt, rg + s0 * gg, gg, rr, rg, t.numel())


def misfit64(t: torch.Tensor, g: torch.Tensor, scale: float, cut=None) -> float:
    """``||t - cut(scale g)||`` of two flat vectors in float64 (``cut``: a map applied to ``scale g`` piece by piece,
    such as a clip; none by default), without a float64 copy of either."""
    total = 0.0
    for p, q in flat_pieces64(t, g):
        q.mul_(scale)
        if cut is not None:
            q = cut(q)
        total += float(torch.dot(p.sub_(q), p))
    return math.sqrt(total)


def row_norms64(G: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """The norms of ``G``'s rows (``dim=1``) or columns (``dim=0``), in float64, without a float64 copy of G."""
    if dim == 0:
        return torch.linalg.vector_norm(G, dim=0, dtype=F64)
    return torch.cat([piece.norm(dim=1) for _, piece in pieces64(G, 0)])


def through_numpy(*tensors: torch.Tensor, gram: bool = False) -> bool:
    """Whether a product of these tensors runs on numpy's BLAS: on the CPU, outside autograd, where numpy's BLAS is
    the faster one (:func:`~fedleak.nets.blas.torch_blas_preferred`) or the product is a Gram product."""
    return (gram or not torch_blas_preferred()) and all(
        t.device.type == "cpu" and not (t.requires_grad and torch.is_grad_enabled()) for t in tensors)


def is_gram(A: torch.Tensor, B: torch.Tensor) -> bool:
    """Whether ``B`` is ``A.T`` (the same memory, transposed): ``A @ B`` is then a Gram product."""
    return (A.dim() == B.dim() == 2 and A.data_ptr() == B.data_ptr() and A.shape == B.T.shape
            and A.stride() == B.T.stride())


def matmul64(A: torch.Tensor, B: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``A @ B`` (float64), into ``out`` where given: on numpy's BLAS where :func:`through_numpy` says so."""
    if not through_numpy(A, B, gram=is_gram(A, B)):
        return torch.matmul(A, B, out=out) if out is not None else A @ B
    a, b = A.detach().numpy(), B.detach().numpy()  # outside autograd: nothing to record
    if out is None:
        return torch.from_numpy(np.matmul(a, b))
    np.matmul(a, b, out=out.detach().numpy())
    return out


def times64(G: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``G @ B`` in float64 (``B`` float64), without a float64 copy of G."""
    if G.dtype == F64:
        return matmul64(G, B)
    out = torch.empty(G.shape[0], B.shape[1], dtype=F64, device=G.device)
    for s, piece in pieces64(G, B.shape[1]):
        matmul64(piece, B, out[s : s + len(piece)])
    return out


def linear64(a: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``a @ W.T`` in float64 (``a`` float64; ``W`` a layer's weight, out x in, of any float dtype)."""
    if W.dtype == F64:
        return matmul64(a, W.T)
    if a.shape[0] * W.shape[0] <= PIECE_ENTRIES:  # a small result: products of whole pieces, then one transposed copy
        return times64(W, a.T).T.contiguous()
    out = torch.empty(a.shape[0], W.shape[0], dtype=F64, device=a.device)
    for s, piece in pieces64(W, a.shape[0]):  # a large one is written a block of columns at a time: no second copy
        out[:, s : s + len(piece)] = matmul64(a, piece.T)
    return out


def back64(d: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``d @ W`` in float64 (``d`` float64, one row per sample; ``W`` out x in, of any float dtype): the
    backward pass through the layer, summed over ``W``'s rows a piece at a time."""
    if W.dtype == F64:
        return matmul64(d, W)
    out = part = None
    for s, piece in pieces64(W, d.shape[0]):
        if out is None:  # the first piece's product is the sum so far; the others go through one reused buffer
            out = matmul64(d[:, s : s + len(piece)], piece)
        elif through_numpy(d):
            part = matmul64(d[:, s : s + len(piece)], piece, out=part)
            out += part
        else:
            out.addmm_(d[:, s : s + len(piece)], piece)
    return out if out is not None else torch.zeros(d.shape[0], W.shape[1], dtype=F64, device=d.device)


def product32(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``A @ B`` of two float32 CPU matrices, taken in plain IEEE float32 arithmetic, returned in float64: on torch's
    BLAS where it is the faster one and torch's float32 matmul is IEEE (:mod:`fedleak.nets.blas`), else on numpy's.
    Each entry carries the rounding of a float32 sum of ``A.shape[1]`` products: for a random sketch of a layer
    only (:mod:`fedleak.attacks.exact.rank_test`)."""
    if torch_blas_preferred() and ieee_float32_matmul():
        return (A.detach() @ B.detach()).to(F64)
    return torch.from_numpy(np.matmul(A.detach().numpy(), B.detach().numpy())).to(F64)
