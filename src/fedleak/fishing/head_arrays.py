"""The dense ReLU head as the per-sample LPs read it: numpy arrays of its layers (float64 once, float32 for the
client-side check), its pre-activations, the rows of a hidden layer's units pulled back to the head's input inside a
region, and the offsets of a region (:class:`HeadOffsets`, computed when read). An MLP that maps its input before
its first layer has the map folded into that layer (a change of layout moves each column to the input value it
reads: :func:`over_inputs`)."""

from __future__ import annotations

import math

import numpy as np
import torch

from fedleak.nets import ReluMLP
from fedleak.nets.input_map import InputMap

U32 = float(np.finfo(np.float32).eps) / 2


class HeadArrays:
    """The head's layers as numpy arrays: float64 (one copy, shared with every other float64 reader of the head
    while it lives) and float32 for the client-side check (the model's own weights when it is float32: no copy).
    Products ``a @ W.T`` read the row-major weights as they are (BLAS takes the transpose). With an ``input_map``
    (an MLP that maps its input first) the map is folded into the first layer, a copy: the head reads the model's
    inputs; :meth:`first_layer_input` gives what its first layer reads."""

    def __init__(self, head: ReluMLP, input_map: InputMap | None = None):
        self.W = [w.cpu().numpy() for w in head.weights()]
        self.b = [None if b is None else b.cpu().numpy() for b in head.biases()]
        self.input_map = input_map
        if input_map is not None:
            scale, shift = (t.cpu().numpy() for t in (input_map.scale, input_map.shift))
            self.b[0] = self.W[0] @ shift + (0.0 if self.b[0] is None else self.b[0])
            self.W[0] = over_inputs(self.W[0] * scale, input_map)
        self.W32 = [w.cpu().numpy() for w in head.weights(torch.float32)]
        self.b32 = [None if b is None else b.cpu().numpy() for b in head.biases(torch.float32)]
        if input_map is not None:
            self.W32[0], self.b32[0] = self.W[0].astype(np.float32), self.b[0].astype(np.float32)
        self.depth = len(self.W) - 1
        self.widths = [w.shape[0] for w in self.W[:-1]]
        self.input_dim = self.W[0].shape[1]
        self._norms: dict[tuple[int, int], np.ndarray] = {}

    def preacts(self, x: np.ndarray, f32: bool = False, layers: int | None = None) -> list[np.ndarray]:
        """Pre-activations of every hidden layer (the first ``layers`` ones) for one input or a batch (rows) of
        head inputs."""
        W, b = (self.W32, self.b32) if f32 else (self.W, self.b)
        a = x.astype(np.float32) if f32 else x
        out = []
        for h in range(self.depth if layers is None else layers):
            z = a @ W[h].T
            if b[h] is not None:
                z = z + b[h]
            out.append(z)
            a = np.maximum(z, 0)
        return out

    def first_layer_input(self, x: np.ndarray) -> np.ndarray:
        """What the model's first layer reads for head inputs ``x`` (one or rows): ``a x + b`` where a map is
        folded in, else ``x``."""
        if self.input_map is None:
            return x
        order = self.input_map.order
        x = x if order is None else x[..., order.numpy()]
        return x * self.input_map.scale.cpu().numpy() + self.input_map.shift.cpu().numpy()

    def row_norms(self, layer: int, order: int = 2) -> np.ndarray:
        """``||W_j||`` (``order`` 1 or 2) of a hidden layer's rows, computed once (workers forked after the first
        call share it)."""
        key = (layer, order)
        if key not in self._norms:
            W = self.W[layer]  # a piece of rows at a time: no temporary the size of the layer
            step = max(1, (1 << 19) // max(W.shape[1], 1))
            self._norms[key] = np.concatenate([np.linalg.norm(W[s : s + step], ord=order, axis=1)
                                               for s in range(0, W.shape[0], step)] or [np.zeros(0)])
        return self._norms[key]

    def checked_preacts(self, x: np.ndarray, x32: np.ndarray, units: np.ndarray, levels: np.ndarray,
                        near: float) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The float64 and float32 pre-activations of one head input (``x`` in float64, ``x32`` as the client's
        float32 pass has it), the float64 last layer computed only where a check can tell it from the float32
        one: where ``|z32| <= near + e_j`` and on the ``units`` whose ``|z32 - level| <= e_j`` (the checks compare
        ``z`` with ``level``), ``e_j = ||W_j|| (8 sqrt(n) u32 ||a32|| + ||a - a32||)`` a generous bound on
        ``|z64 - z32|`` (float32's rounding of the last layer in the sqrt(n) model, some 1000 times the errors
        seen, plus its input's difference). Elsewhere it is the float32 value, on the same side of zero, of
        ``+-near`` and of every level: the checks read the same. For a head of ``depth`` layers that saves one
        float64 pass over the last layer's weights (all of a CNN's wide head)."""
        z32 = self.preacts(x32, f32=True)
        z64 = self.preacts(x, layers=self.depth - 1)
        L = self.depth - 1
        a = x if L == 0 else np.maximum(z64[-1], 0)
        a32 = (x32 if L == 0 else np.maximum(z32[-2], 0)).astype(np.float64)
        e = self.row_norms(L) * (8 * math.sqrt(len(a)) * U32 * float(np.linalg.norm(a32))
                                   + float(np.linalg.norm(a - a32)))
        last = z32[-1].astype(np.float64)
        units = np.asarray(units, dtype=np.int64)
        close = units[np.abs(last[units] - levels) <= e[units]]
        rows = np.union1d(close, np.nonzero(np.abs(last) <= near + e)[0])
        last[rows] = self.W[L][rows] @ a + (0.0 if self.b[L] is None else self.b[L][rows])
        return z64 + [last], z32

    def offsets(self, pattern: list[np.ndarray], x0: np.ndarray | None = None) -> list[HeadOffsets]:
        """Affine offsets ``c_h`` of every hidden layer inside the region ``pattern`` for the head input
        ``x0`` (None: zero), computed when read (:class:`HeadOffsets`)."""
        out: list[HeadOffsets] = []
        for h in range(self.depth):
            out.append(HeadOffsets(self, h, x0 if h == 0 else pattern[h - 1], out[-1] if out else None))
        return out

    def rows(self, layer: int, neurons: np.ndarray, pattern: list[np.ndarray]) -> np.ndarray:
        """``J`` rows (k x head input) of the given neurons of hidden layer ``layer`` inside ``pattern``."""
        R = self.W[layer][neurons]
        for h in range(layer - 1, -1, -1):
            R = (R * pattern[h]) @ self.W[h]
        return R


class HeadOffsets:
    """The offsets of one hidden layer of the head inside a region, computed when read: ``offsets[idx]`` of the
    first layer is ``b[idx] + W[idx] @ x0``, a product with the rows asked only (the LPs read a few dozen rows;
    the whole layer of a CNN's 25088-wide head costs a pass over its weights), a deeper layer needs the whole
    layer below (``below``, masked by its region ``mask``), computed once."""

    def __init__(self, head: HeadArrays, layer: int, mask: np.ndarray | None, below: HeadOffsets | None):
        self.head, self.layer, self.mask, self.below = head, layer, mask, below
        self._all: np.ndarray | None = None

    def values(self, idx=slice(None)) -> np.ndarray:
        """The offsets of the units ``idx`` (all by default), computed now."""
        W, b = self.head.W[self.layer], self.head.b[self.layer]
        a = self.mask if self.below is None else self.mask * self.below.full()
        c = np.zeros(W.shape[0])[idx] if b is None else b[idx].copy()
        return c if a is None else c + W[idx] @ a

    def full(self) -> np.ndarray:
        if self._all is None:
            self._all = self.values()
        return self._all

    def __getitem__(self, idx) -> np.ndarray:
        return self.values(idx) if self.below is None and self._all is None else self.full()[idx]


def over_inputs(rows: np.ndarray, input_map: InputMap) -> np.ndarray:
    """Rows (n x values) over what the first layer reads, as rows over the model's inputs: each column moved to the
    input value it reads, where the map changes the layout."""
    if input_map.order is None:
        return rows
    out = np.empty_like(rows)
    out[:, input_map.order.numpy()] = rows
    return out
