"""The observed gradient read in float64 a piece at a time.

The head attack keeps the observed gradient in the dtype the client sent (float32, usually): a float64 copy of a
whole layer would double the memory the update takes. Every value is read in float64, which holds float32 values
exactly: rows gathered from a layer are converted after the gather (:func:`rows64`), and whole-layer reductions
and products convert a piece of rows at a time into one reused buffer (:func:`pieces64`; a fresh buffer per piece
costs more in page faults than the conversion itself on a 25088-wide layer).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

F64 = torch.float64
PIECE_ENTRIES = 1 << 19  # float64 entries of a layer converted at once (4 MiB) ...
PIECE_ROWS = 128  # ... or this many rows of a wide layer (a product then reads its other factor fewer times)


def rows64(G: torch.Tensor, rows) -> torch.Tensor:
    """``G[rows]`` in float64."""
    return G[rows].to(F64)


def pieces64(G: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, G[start:start + n] in float64)`` over ``G``'s rows, a piece at a time (the pieces share one
    buffer: use each before asking for the next)."""
    if G.dtype == F64:
        yield 0, G
        return
    step = max(PIECE_ROWS, PIECE_ENTRIES // max(G.shape[1], 1))
    buffer = torch.empty(min(step, G.shape[0]), G.shape[1], dtype=F64, device=G.device)
    for s in range(0, G.shape[0], step):
        piece = buffer[: min(step, G.shape[0] - s)]
        piece.copy_(G[s : s + step])
        yield s, piece


def row_norms64(G: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """The norms of ``G``'s rows (``dim=1``) or columns (``dim=0``), in float64, without a float64 copy of G."""
    if dim == 0:
        return torch.linalg.vector_norm(G, dim=0, dtype=F64)
    return torch.cat([piece.norm(dim=1) for _, piece in pieces64(G)])


def times64(G: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``G @ B`` in float64 (``B`` float64), without a float64 copy of G."""
    if G.dtype == F64:
        return G @ B
    out = torch.empty(G.shape[0], B.shape[1], dtype=F64, device=G.device)
    for s, piece in pieces64(G):
        torch.matmul(piece, B, out=out[s : s + len(piece)])
    return out
