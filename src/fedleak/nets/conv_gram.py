"""The Gram matrix ``A^T diag(w) A`` of an unrolled convolution, assembled straight into band storage.

Solving a conv block for its input means least squares on the rows of ``A`` (the unrolled conv) whose units
are known; the normal matrix ``N = A^T diag(w) A`` (``w`` = 1 on the rows used, 0 elsewhere) couples only
inputs within two kernel widths of each other. Ordered *pixel-major* (``(y, x, channel)`` instead of torch's
``(channel, y, x)``), ``N`` is a band matrix of half-bandwidth about ``(kh - 1) * W * C``, which LAPACK's band
Cholesky factors in milliseconds.

Forming ``N`` by a sparse product ``J^T J`` costs more than factoring it, so :class:`ConvGram` assembles it
from the kernel instead: for every output position ``r`` and pair of kernel taps ``(t1, t2)``,
``N[in(r, t1), in(r, t2)] += sum_co w[co, r] K[co, t1] K[co, t2]`` -- one dense product
``w^T (K ⊗ K)`` and one scatter-add whose indices depend on the layer only (computed once per block).
"""

from __future__ import annotations

import numpy as np

# an assembly whose index arrays would exceed this many (output position, tap pair) entries is not built
# (the caller falls back to a sparse product); 25x25 inputs with 6 channels and 3x3 kernels need 1.8M
MAX_ENTRIES = 20_000_000


def pixel_major_order(shape: tuple[int, int, int]) -> np.ndarray:
    """Band position -> torch's flat ``(channel, y, x)`` index, for the pixel-major order ``(y, x, channel)``."""
    C, H, W = shape
    return np.arange(C * H * W).reshape(C, H, W).transpose(1, 2, 0).reshape(-1)


class ConvGram:
    """Band-storage assembly of ``A^T diag(w) A`` for one conv layer (BN folded into ``kernel``).

    ``order``: pixel-major order of the inputs (``x[order]`` is the input in band order); ``bandwidth``:
    the half-bandwidth of ``N`` in that order. :meth:`band` returns LAPACK's lower band storage
    (``ab[i - j, j] = N[i, j]``, shape ``(bandwidth + 1, n)``) for unit weights ``w``.
    """

    def __init__(self, kernel: np.ndarray, in_shape: tuple[int, int, int], out_hw: tuple[int, int],
                 stride: tuple[int, int], padding: tuple[int, int]):
        co_n, ci_n, kh, kw = kernel.shape
        C, H, W = in_shape
        Ho, Wo = out_hw
        self.n = C * H * W
        self.channels_out = co_n
        taps = ci_n * kh * kw
        R = Ho * Wo
        oy, ox, ci, ky, kx = np.meshgrid(np.arange(Ho), np.arange(Wo), np.arange(ci_n), np.arange(kh), np.arange(kw),
                                         indexing="ij")
        iy = oy * stride[0] - padding[0] + ky
        ix = ox * stride[1] - padding[1] + kx
        valid = ((iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)).reshape(R, taps)
        pos = ((iy * W + ix) * C + ci).reshape(R, taps)  # pixel-major position of each tap's input
        p1 = pos[:, :, None]
        p2 = pos[:, None, :]
        keep = valid[:, :, None] & valid[:, None, :] & (p1 >= p2)  # the lower triangle suffices
        self.sel = np.flatnonzero(keep)
        diff = np.broadcast_to(p1 - p2, keep.shape).reshape(-1)[self.sel]
        col = np.broadcast_to(p2, keep.shape).reshape(-1)[self.sel]
        self.bandwidth = int(diff.max(initial=0))
        self.dest = diff * self.n + col
        kf = kernel.reshape(co_n, taps)
        self.pairs = (kf[:, :, None] * kf[:, None, :]).reshape(co_n, taps * taps)  # K ⊗ K per output channel
        self.positions = R
        self.order = pixel_major_order(in_shape)
        self.max_terms = co_n * kh * kw  # at most this many products are summed into one entry of N

    @staticmethod
    def entries(kernel_shape: tuple[int, ...], out_hw: tuple[int, int]) -> int:
        co_n, ci_n, kh, kw = kernel_shape
        return out_hw[0] * out_hw[1] * (ci_n * kh * kw) ** 2

    def band(self, w: np.ndarray) -> np.ndarray:
        """Lower band storage of ``A^T diag(w) A`` (pixel-major order) for unit weights ``w`` (conv_dim,
        torch's ``(channel, y, x)`` order)."""
        per_pos = w.reshape(self.channels_out, self.positions).T @ self.pairs  # R x taps^2
        ab = np.bincount(self.dest, weights=per_pos.reshape(-1)[self.sel], minlength=(self.bandwidth + 1) * self.n)
        return ab.reshape(self.bandwidth + 1, self.n)
