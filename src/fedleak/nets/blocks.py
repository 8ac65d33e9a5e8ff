"""A convolutional block ``pool(relu(bn(conv(x))))`` of a network, and the linear maps the exact methods read.

Per sample the block computes ``out = pool(relu(A x + c))`` with ``A`` the unrolled (sparse) convolution,
eval-mode batch norm folded in. :meth:`ConvBlock.affine` returns ``A`` (scipy CSR, float64, unit order
``(channel, y, x)`` like torch's flatten) and ``c``; :meth:`ConvBlock.pool_matrix` the average-pooling
matrix, :meth:`ConvBlock.pool_windows` the max-pooling windows.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedleak.nets.cast import fingerprint
from fedleak.nets.conv_gram import MAX_ENTRIES, ConvGram
from fedleak.nets.layers import BatchNorm, Conv, Pool

if TYPE_CHECKING:  # scipy.sparse (0.2 s to import) is loaded by the methods that build sparse matrices
    import scipy.sparse as sp

# the unrolled conv and its band assembly, per module and kernel attribute: a model read again (every attack reads
# it anew) reuses them while its conv and batch-norm tensors are unchanged
_DERIVED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def equations_needed(unknowns: int, pooled: bool) -> int:
    """Equations (non-zero output units) a sample must give before a block's input can be determined: as many as
    its unknowns (rows of full column rank), one more when it pools (the rows must also positively span them)."""
    return unknowns + (1 if pooled else 0)


@dataclass(frozen=True, eq=False)
class ConvBlock:
    """``pool(relu(bn(conv(x))))`` with the shapes (C, H, W) of its input, conv output and output."""

    conv: Conv
    bn: BatchNorm | None
    pool: Pool | None
    in_shape: tuple[int, int, int]
    conv_shape: tuple[int, int, int]
    out_shape: tuple[int, int, int]

    @property
    def name(self) -> str:
        return self.conv.name

    @property
    def in_dim(self) -> int:
        return math.prod(self.in_shape)

    @property
    def conv_dim(self) -> int:
        return math.prod(self.conv_shape)

    @property
    def out_dim(self) -> int:
        return math.prod(self.out_shape)

    @property
    def never_determined(self) -> bool:
        """Whether the block's output determines its input for no input at all: it has fewer output units (the
        most equations a sample can give) than :func:`equations_needed`."""
        return self.out_dim < equations_needed(self.in_dim, self.pool is not None)

    def shortfall(self) -> str:
        """The block's most equations against its unknowns, in words."""
        after = "" if self.pool is None else f" after {self.pool.text}"
        out, given = (" x ".join(map(str, shape)) for shape in (self.out_shape, self.in_shape))
        return (f"conv layer '{self.name}' gives at most {self.out_dim} equations ({out}{after}) for {self.in_dim} "
                f"unknowns ({given})")

    def folded(self, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight (C_out x C_in x kh x kw) and bias (C_out) of conv with eval-mode BN folded in."""
        W = self.conv.weight(dtype)
        b = (torch.zeros(W.shape[0], dtype=dtype, device=W.device) if self.conv.bias is None
             else self.conv.bias.detach().to(dtype))
        if self.bn is not None:
            scale, shift = self.bn.affine(dtype)
            W = W * scale[:, None, None, None]
            b = b * scale + shift
        return W, b

    def preact(self, x: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
        """Pre-activations (n x C x H x W) of the conv (BN folded) for inputs ``x`` (n x in_shape)."""
        W, b = self.folded(dtype)
        return self.conv.geometry.conv(x.to(dtype).reshape(-1, *self.in_shape), W, b)

    def apply_pool(self, a: torch.Tensor) -> torch.Tensor:
        return a if self.pool is None else self.pool.apply(a)

    def forward(self, x: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
        """The block's output (n x out_shape) for inputs ``x`` (n x in_shape)."""
        return self.apply_pool(torch.relu(self.preact(x, dtype)))

    def state(self) -> tuple:
        """What the block's linear maps depend on: shapes, conv geometry, and a fingerprint of every conv/BN
        tensor (:func:`fedleak.nets.cast.fingerprint`: taken once per tensor inside
        :func:`fedleak.nets.cast.unchanged`)."""
        norm = [] if self.bn is None else [*self.bn.module.parameters(recurse=False),
                                           *self.bn.module.buffers(recurse=False)]
        tensors = [*self.conv.tensors(), *norm]
        return (self.in_shape, self.conv_shape, self.conv.geometry, tuple(map(fingerprint, tensors)))

    def derived(self, name: str, build: Callable[[], object]):
        """``build()``, computed once per convolution and state (see :meth:`state`)."""
        key = self.state()
        per_kernel = _DERIVED.setdefault(self.conv.owner, {})  # a module may hold several functional kernels
        entry = per_kernel.get(self.conv.weight_attr)
        if entry is None or entry[0] != key:
            entry = per_kernel[self.conv.weight_attr] = (key, {})
        if name not in entry[1]:
            entry[1][name] = build()
        return entry[1][name]

    @property
    def affine(self) -> tuple[sp.csr_matrix, np.ndarray]:
        """The unrolled conv (BN folded) ``A`` (conv_dim x in_dim, CSR float64) and bias ``c`` (conv_dim)."""
        return self.derived("affine", self.unrolled)

    def unrolled_times(self, x: np.ndarray, absolute: bool = False) -> np.ndarray:
        """``A x`` (``|A| x`` when ``absolute``) for one flattened input ``x`` (float64), ``A`` of :attr:`affine`,
        by a float64 conv on the CPU (no sparse product)."""
        W = self.folded(torch.float64)[0].cpu()
        z = self.conv.geometry.conv(torch.from_numpy(x).reshape(1, *self.in_shape), W.abs() if absolute else W)
        return z.reshape(-1).numpy()

    def unrolled_transpose_times(self, v: np.ndarray) -> np.ndarray:
        """``A^T v`` for one flattened conv output ``v`` (float64), by a transposed float64 conv on the CPU."""
        W = self.folded(torch.float64)[0].cpu()
        z = self.conv.geometry.transposed((1, *self.in_shape), W, torch.from_numpy(v).reshape(1, *self.conv_shape))
        return z.reshape(-1).numpy()

    def unrolled(self) -> tuple[sp.csr_matrix, np.ndarray]:
        """:attr:`affine`, built row by row in CSR order: an output unit's taps ``(ci, ky, kx)`` that fall inside the
        input are its columns, in increasing order; every output channel has the same pattern (no sort, no COO)."""
        import scipy.sparse as sp

        W, b = self.folded(torch.float64)
        W = W.cpu().numpy()
        co_n, ci_n, kh, kw = W.shape
        _, H, Wd = self.in_shape
        _, Ho, Wo = self.conv_shape
        (sy, sx), (py, px) = self.conv.stride, self.conv.padding  # (the padding before: after it, taps fall outside)
        iy = np.arange(Ho)[:, None] * sy - py + np.arange(kh)[None, :]  # (oy, ky) -> input row
        ix = np.arange(Wo)[:, None] * sx - px + np.arange(kw)[None, :]  # (ox, kx) -> input column
        shape = (Ho, Wo, ci_n, kh, kw)
        ok = np.broadcast_to((((iy >= 0) & (iy < H))[:, None, None, :, None]
                              & ((ix >= 0) & (ix < Wd))[None, :, None, None, :]), shape)
        cols = (np.arange(ci_n)[None, None, :, None, None] * H + iy[:, None, None, :, None]) * Wd \
            + ix[None, :, None, None, :]
        cols = np.broadcast_to(cols, shape)[ok]  # one output channel's columns, unit by unit
        per_unit = ok.reshape(Ho * Wo, -1).sum(1)
        vals = np.broadcast_to(W[:, None, None], (co_n, *shape))[:, ok]  # (co, taps of one channel)
        indptr = np.concatenate([[0], np.cumsum(np.tile(per_unit, co_n))])
        A = sp.csr_matrix((vals.ravel(), np.tile(cols, co_n), indptr), shape=(self.conv_dim, self.in_dim))
        c = np.repeat(b.cpu().numpy(), Ho * Wo)
        return A, c

    @property
    def gram(self) -> ConvGram | None:
        """Band assembly of ``A^T diag(w) A`` (:class:`~fedleak.nets.conv_gram.ConvGram`), or None for a layer
        too large for it (the caller then forms the product from ``affine``)."""
        return self.derived("gram", self.band_assembly)

    def band_assembly(self) -> ConvGram | None:
        W, _ = self.folded(torch.float64)
        out_hw = self.conv_shape[1:]
        if ConvGram.entries(tuple(W.shape), out_hw) > MAX_ENTRIES:
            return None
        return ConvGram(W.cpu().numpy(), self.in_shape, out_hw, self.conv.stride, self.conv.padding)

    @cached_property
    def pool_windows(self) -> np.ndarray | None:
        """(out_dim x k) indices of the conv units each pooled unit covers (None without pooling)."""
        if self.pool is None:
            return None
        C, Ho, Wo = self.conv_shape
        _, Po, Qo = self.out_shape
        ky, kx = self.pool.kernel
        c, py, px, dy, dx = np.meshgrid(np.arange(C), np.arange(Po), np.arange(Qo), np.arange(ky), np.arange(kx),
                                        indexing="ij")
        idx = (c * Ho + py * ky + dy) * Wo + px * kx + dx
        return idx.reshape(C * Po * Qo, ky * kx)

    @cached_property
    def pool_matrix(self) -> sp.csr_matrix | None:
        """Average pooling as a (out_dim x conv_dim) CSR matrix (None unless the block average-pools)."""
        if self.pool is None or self.pool.kind != "avg":
            return None
        win = self.pool_windows
        k = win.shape[1]
        rows = np.repeat(np.arange(win.shape[0]), k)
        import scipy.sparse as sp

        return sp.csr_matrix((np.full(rows.shape, 1.0 / k), (rows, win.ravel())), shape=(win.shape[0], self.conv_dim))

    def parameter_names(self) -> list[str]:
        return self.conv.parameter_names() + (self.bn.parameter_names() if self.bn is not None else [])
