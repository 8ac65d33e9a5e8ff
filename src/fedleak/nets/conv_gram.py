"""The Gram matrix ``A^T diag(w) A`` of an unrolled convolution, assembled straight into band storage.

Solving a conv block for its input means least squares on the rows of ``A`` (the unrolled conv) whose units
are known; the normal matrix ``N = A^T diag(w) A`` (``w`` = 1 on the rows used, 0 elsewhere) couples only
inputs within two kernel widths of each other. Ordered *pixel-major* (``(y, x, channel)`` instead of torch's
``(channel, y, x)``), ``N`` is a band matrix of half-bandwidth about ``(kh - 1) * W * C``, which LAPACK's band
Cholesky factors in milliseconds.

Forming ``N`` by a sparse product ``J^T J`` costs more than factoring it, so :class:`ConvGram` assembles it
from the kernel instead: for every output position ``r`` and pair of kernel taps ``(t1, t2)``,
``N[in(r, t1), in(r, t2)] += sum_co w[co, r] K[co, t1] K[co, t2]`` -- one dense product
``(K ⊗ K)^T w`` over the tap pairs of the lower triangle, then one strided add per pair of kernel positions
(the band row of a tap pair does not depend on ``r``, so all its products land in one rectangle of pixels).
The product is laid out tap pair by tap pair (each pair's products one contiguous image), so those adds read
contiguous rows of pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedleak.nets.float64 import matmul64
from fedleak.nets.scratch import work_array

# a layer with more (output position, tap pair) products than this is not assembled (the caller falls back to a
# sparse product); 28x28 outputs of 6 input channels and 3x3 kernels have 2.3M
MAX_ENTRIES = 20_000_000


def pixel_major_order(shape: tuple[int, int, int]) -> np.ndarray:
    """Band position -> torch's flat ``(channel, y, x)`` index, for the pixel-major order ``(y, x, channel)``."""
    C, H, W = shape
    return np.arange(C * H * W).reshape(C, H, W).transpose(1, 2, 0).reshape(-1)


def tap_window(k: int, size: int, out: int, stride: int, pad: int) -> tuple[int, int]:
    """The output positions ``[lo, hi)`` along one axis whose kernel tap ``k`` falls inside an input of ``size``."""
    inside = [o for o in range(out) if 0 <= o * stride - pad + k < size]
    return (inside[0], inside[-1] + 1) if inside else (0, 0)


@dataclass(frozen=True)
class TapPair:
    """A pair of kernel positions ``(ky1, kx1) >= (ky2, kx2)`` (in pixel-major order) with the channel pairs it
    contributes: rows ``cols`` of :attr:`ConvGram.pairs`, band rows ``diff`` and input channels ``c2``, for
    the output positions ``oy``/``ox`` where both taps fall inside the input; ``y``/``x`` the first input
    pixel of the second tap; ``base``: the pixel offset of the two taps in the band (``diff`` without the
    channels)."""

    base: int
    cols: slice
    diff: np.ndarray
    c2: np.ndarray
    oy: slice
    ox: slice
    y: int
    x: int


class ConvGram:
    """Band-storage assembly of ``A^T diag(w) A`` for one conv layer (BN folded into ``kernel``).

    ``order``: pixel-major order of the inputs (``x[order]`` is the input in band order); ``bandwidth``:
    the half-bandwidth of ``N`` in that order. :meth:`band` returns LAPACK's lower band storage
    (``ab[i - j, j] = N[i, j]``, shape ``(bandwidth + 1, n)``) for unit weights ``w``.

    A tap pair's offset in the band does not depend on the output position, so for each pair of kernel
    positions the products of all its channel pairs land in one rectangle of input pixels: one product
    ``pairs w`` (lower-triangle pairs only), one add of a rectangle per pair of kernel positions, and one
    write to the band per pixel offset.
    """

    def __init__(self, kernel: np.ndarray, in_shape: tuple[int, int, int], out_hw: tuple[int, int],
                 stride: tuple[int, int], padding: tuple[int, int]):
        co_n, ci_n, kh, kw = kernel.shape
        C, H, W = in_shape
        Ho, Wo = out_hw
        self.n = C * H * W
        self.in_shape = in_shape
        self.out_hw = out_hw
        self.stride = stride
        self.channels_out = co_n
        kf = kernel.reshape(co_n, ci_n, kh * kw)
        columns, self.groups, start = [], [], 0

        for s1 in range(kh * kw):
            for s2 in range(kh * kw):
                (ky1, kx1), (ky2, kx2) = divmod(s1, kw), divmod(s2, kw)
                base = ((ky1 - ky2) * W + (kx1 - kx2)) * C
                if base < 0:
                    continue
                c1, c2 = (a.reshape(-1) for a in np.meshgrid(np.arange(ci_n), np.arange(ci_n), indexing="ij"))
                if base == 0:
                    c1, c2 = c1[c1 >= c2], c2[c1 >= c2]
                ylo, yhi = tap_window(ky1, H, Ho, stride[0], padding[0])
                ylo2, yhi2 = tap_window(ky2, H, Ho, stride[0], padding[0])
                xlo, xhi = tap_window(kx1, W, Wo, stride[1], padding[1])
                xlo2, xhi2 = tap_window(kx2, W, Wo, stride[1], padding[1])
                oy, ox = slice(max(ylo, ylo2), min(yhi, yhi2)), slice(max(xlo, xlo2), min(xhi, xhi2))
                if oy.start >= oy.stop or ox.start >= ox.stop:
                    continue
                columns.append(kf[:, c1, s1] * kf[:, c2, s2])
                self.groups.append(TapPair(base, slice(start, start + len(c1)), base + c1 - c2, c2, oy, ox,
                                           oy.start * stride[0] - padding[0] + ky2,
                                           ox.start * stride[1] - padding[1] + kx2))
                start += len(c1)
        # K ⊗ K, lower-triangle pairs (rows) by output channel (columns): ``pairs @ w`` is pair-major
        self.pairs = np.ascontiguousarray(np.concatenate(columns, axis=1).T)
        # the tap pairs of one pixel offset have the same band entries: their products are summed per pixel, then
        # written to the band in one step (an entry ``base + c1 - c2`` belongs to one offset only)
        by_base: dict[int, list[TapPair]] = {}
        for g in self.groups:
            by_base.setdefault(g.base, []).append(g)
        self.offsets = tuple(PixelOffset(tuple(gs), band_writes(gs[0])) for gs in by_base.values())
        self.bandwidth = int(max(int(g.diff.max()) for g in self.groups))
        self.positions = Ho * Wo
        self.order = pixel_major_order(in_shape)
        self.max_terms = co_n * kh * kw  # at most this many products are summed into one entry of N

    @staticmethod
    def entries(kernel_shape: tuple[int, ...], out_hw: tuple[int, int]) -> int:
        co_n, ci_n, kh, kw = kernel_shape
        return out_hw[0] * out_hw[1] * (ci_n * kh * kw) ** 2

    def band(self, w: np.ndarray) -> np.ndarray:
        """Lower band storage of ``A^T diag(w) A`` (pixel-major order) for unit weights ``w`` (conv_dim,
        torch's ``(channel, y, x)`` order), Fortran-ordered (each column of ``N``'s band contiguous, the layout
        LAPACK factors in place). Inside :func:`fedleak.nets.scratch.reused_arrays` the array is reused by the
        next call (it writes the same entries every time, so the band's structural zeros stay zero)."""
        C, H, W = self.in_shape
        Ho, Wo = self.out_hw
        sy, sx = self.stride
        per_pair = work_array(("band products", self), (len(self.pairs), self.positions))
        matmul64(torch.from_numpy(self.pairs), torch.from_numpy(w.reshape(self.channels_out, self.positions)),
                 torch.from_numpy(per_pair))  # on the CPU's faster BLAS (fedleak.nets.blas)
        per_pair = per_pair.reshape(-1, Ho, Wo)
        ab = work_array(("band", self), (H, W, C, self.bandwidth + 1))
        for offset in self.offsets:
            acc = work_array(("band offset", self), (len(offset.pairs[0].c2), H, W))
            acc.fill(0.0)
            for g in offset.pairs:
                ny, nx = g.oy.stop - g.oy.start, g.ox.stop - g.ox.start
                rows, cols = slice(g.y, g.y + sy * (ny - 1) + 1, sy), slice(g.x, g.x + sx * (nx - 1) + 1, sx)
                acc[:, rows, cols] += per_pair[g.cols, g.oy, g.ox]
            for write in offset.writes:
                ab[:, :, write.channel, write.band] = acc[write.rows].transpose(1, 2, 0)
        return ab.reshape(self.n, self.bandwidth + 1).T


@dataclass(frozen=True)
class BandWrite:
    """The rows ``rows`` of a pixel offset's summed products (one per channel pair) that land in the band rows
    ``band`` (a contiguous run) of input channel ``channel``'s column: a slice write to the band, where one fancy-
    indexed write of every channel pair at once costs several times as much."""

    rows: slice | np.ndarray
    channel: int
    band: slice


@dataclass(frozen=True)
class PixelOffset:
    """The tap pairs of one pixel offset (their products are summed per pixel) and the band writes of the sum."""

    pairs: tuple[TapPair, ...]
    writes: tuple[BandWrite, ...]


def band_writes(pair: TapPair) -> tuple[BandWrite, ...]:
    """The band writes of a pixel offset whose channel pairs are ``pair``'s (every tap pair of an offset has the
    same): for each second channel ``c2``, its pairs' band rows ``base + c1 - c2`` are consecutive in ``c1``."""
    writes = []
    for c2 in np.unique(pair.c2).tolist():
        sel = np.flatnonzero(pair.c2 == c2)
        diff = pair.diff[sel]
        if not np.array_equal(diff, np.arange(diff[0], diff[0] + len(diff))):
            raise AssertionError("a channel's band rows are not consecutive")  # pragma: no cover - by construction
        steps = np.unique(np.diff(sel))
        rows = slice(int(sel[0]), int(sel[-1]) + 1, int(steps[0])) if len(steps) == 1 else sel
        writes.append(BandWrite(rows, c2, slice(int(diff[0]), int(diff[0]) + len(diff))))
    return tuple(writes)
