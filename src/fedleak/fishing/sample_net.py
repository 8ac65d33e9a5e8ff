"""The network as the per-sample LPs read it: inputs to every ReLU layer, linear inside a sample's region.

A :class:`~fedleak.nets.Network` is piecewise linear in its input. Inside the *region* of one sample (the
signs of its conv units and, for a max-pooled block, which unit is the max of each window) the features
are ``f = J x + c`` and every pre-activation is an affine function of the input. :class:`SampleNet` is
that linearised network for one sample; its layers are, per conv block, the conv units (and, for a
max-pooled block, the *gaps* ``z_max - z_u`` that keep each window's max where it is), then the head's
hidden layers. An MLP is a network without conv blocks: its sample network is the head itself.

* ``preacts`` is the real (piecewise-linear) forward pass, in float64 or float32 (the client's precision);
* ``rows`` pulls ``W_h[j]`` back to the input through the head, the region masks, the (un)pooling and the
  transposed convs (``conv2d_input``), never forming a dense Jacobian;
* ``offsets`` come from a masked forward pass of a zero input.

A model that maps its input before its first layer (``(x - mean) / std`` inside ``forward``, per channel or per
value: :class:`~fedleak.nets.input_map.InputMap`) is read on its own inputs: the map is folded into an MLP's first
layer (``W diag(a)``, ``c + W b``) or run before a CNN's first conv (its rows end with ``* a``, its offsets are the
pass of ``x = 0``, i.e. of ``b``), so every LP works on the model's inputs and their data range; a map that changes
the layout moves each column to the input value it reads.

Torch work runs on the model's device (:attr:`fedleak.nets.Network.device`); the arrays the LPs read
are numpy float64 on the CPU.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from fedleak.fishing.head_arrays import HeadArrays, over_inputs
from fedleak.nets import ConvBlock, Network
from fedleak.nets.input_map import InputMap


class ConvStack:
    """The conv blocks of a network (eval-mode BN folded), float64 and float32, on the model's device, after the
    model's ``input_map`` when it has one (run on the inputs: :meth:`tensor`; rows pulled back through it:
    :meth:`input_rows`).

    Empty for an MLP: then :meth:`features` is the identity (an MLP's map is folded into :class:`HeadArrays`).
    """

    def __init__(self, net: Network, input_map: InputMap | None = None):
        self.net = net
        self.blocks: tuple[ConvBlock, ...] = net.blocks
        self.input_shape = net.input_shape
        self.device = net.device
        self.input_map = input_map if net.blocks else None

    def tensor(self, x: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        """One input or a batch (flat rows) as a torch batch of what the first conv reads, on the device."""
        t = torch.from_numpy(np.ascontiguousarray(np.atleast_2d(x))).to(device=self.device, dtype=dtype)
        if self.input_map is not None:
            order = self.input_map.order
            t = t if order is None else t[:, order.to(t.device)]
            t = t * self.input_map.scale.to(t) + self.input_map.shift.to(t)
        return t.reshape(-1, *self.input_shape)

    def input_rows(self, R: torch.Tensor) -> np.ndarray:
        """Rows over what the first conv reads (n x input_dim) as rows over the model's inputs."""
        if self.input_map is None:
            return R.cpu().numpy()
        return over_inputs((R * self.input_map.scale.to(R)).cpu().numpy(), self.input_map)

    def forward(self, x: np.ndarray, f32: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Conv pre-activations (per block, n x C x H x W) and the features (n x feature_dim), on the device."""
        dtype = torch.float32 if f32 else torch.float64
        with torch.no_grad():
            run = self.net.conv_pass(self.tensor(x, dtype), dtype)
        return run.preacts, run.features

    def features(self, X: np.ndarray, f32: bool = False) -> np.ndarray:
        """The head inputs (n x feature_dim, numpy) of a batch of flat inputs ``X``."""
        if not self.blocks:
            return X
        return self.forward(X, f32)[1].cpu().numpy()


def _onehot(neurons: np.ndarray, dim: int) -> np.ndarray:
    R = np.zeros((len(neurons), dim))
    R[np.arange(len(neurons)), neurons] = 1.0
    return R


def _window_max(blk: ConvBlock, z: torch.Tensor) -> np.ndarray:
    """The conv unit (flat index) that is the max of each max-pooling window, for one sample's ``z``."""
    _, idx = F.max_pool2d(z.reshape(1, *blk.conv_shape), blk.pool.kernel, blk.pool.kernel, return_indices=True)
    C, H, W = blk.conv_shape
    return (idx.reshape(C, -1).cpu().numpy() + (np.arange(C) * H * W)[:, None]).reshape(-1)


class SampleNet:
    """The linearised network of one sample ``x`` (flat, float64): layers = per conv block its units (plus
    its window gaps when it max-pools), then the head's hidden layers. ``preacts`` is the real forward
    pass; ``rows``/``offsets`` are exact inside the region ``pattern`` (and the window maxima of ``x``).
    This is the interface :func:`fedleak.fishing.lp.solve_sample` uses."""

    def __init__(self, stack: ConvStack, head: HeadArrays, x: np.ndarray):
        self.stack, self.head, self.x = stack, head, x
        self.clean_head: list[np.ndarray] | None = None  # the head's float64 pre-activations of x, when known
        self.layers: list[tuple[str, int]] = []  # ("conv", block) or ("gap", block)
        self.conv_layer: list[int] = []  # layer index of each block's conv units
        self.clean: list[np.ndarray] = []  # the clean conv pre-activations of x, per block (flat)
        self.selection: list[np.ndarray | None] = []  # max pooling: the max unit of each window
        self.gaps: list[tuple[np.ndarray, np.ndarray] | None] = []  # (max unit, other unit) per gap
        self._dev: list[tuple[torch.Tensor, ...] | None] = []  # the same indices on the device
        if stack.blocks:
            zs, _ = stack.forward(x)
            for i, (blk, z) in enumerate(zip(stack.blocks, zs)):
                self.conv_layer.append(len(self.layers))
                self.layers.append(("conv", i))
                self.clean.append(z.reshape(-1).cpu().numpy())
                if blk.pool is not None and blk.pool.kind == "max":
                    sel = _window_max(blk, z)
                    win = blk.pool_windows
                    others = win[win != sel[:, None]].reshape(len(win), -1)
                    gap = (np.repeat(sel, others.shape[1]), others.reshape(-1))
                    self.selection.append(sel)
                    self.gaps.append(gap)
                    self._dev.append(tuple(torch.from_numpy(a).to(stack.device) for a in (sel, *gap)))
                    self.layers.append(("gap", i))
                else:
                    self.selection.append(None)
                    self.gaps.append(None)
                    self._dev.append(None)
        self.shift = len(self.layers)  # the head's hidden layer h is layer shift + h

    def clean_preacts(self, x: np.ndarray) -> list[np.ndarray]:
        """:meth:`preacts` of ``x``, from what is known when ``x`` is this sample's own input (the conv
        pre-activations and, when the caller set :attr:`clean_head` from a pass over the batch, the head's)."""
        if self.clean_head is None or not np.array_equal(x, self.x):
            return self.preacts(x)
        conv = [self.clean[i] if kind == "conv" else self.clean[i][self.gaps[i][0]] - self.clean[i][self.gaps[i][1]]
                for kind, i in self.layers]
        return conv + list(self.clean_head)

    def stack_pattern(self) -> list[np.ndarray]:
        """The clean region of the conv layers: unit signs, and every window gap non-negative."""
        return [(self.clean[i] > 0).astype(np.float64) if kind == "conv" else np.ones(len(self.gaps[i][0]))
                for kind, i in self.layers]

    def watched(self, layer: int) -> np.ndarray | bool:
        """Units of ``layer`` whose sign changes the forward pass (a max-pooled block: its window maxima)."""
        if layer < self.shift:
            kind, i = self.layers[layer]
            if kind == "conv" and self.selection[i] is not None:
                mask = np.zeros(self.stack.blocks[i].conv_dim, dtype=bool)
                mask[self.selection[i]] = True
                return mask
        return True

    def walkable(self, layer: int) -> bool:
        """Whether the region may move at ``layer``: hidden and conv units may change side; the window
        maxima of a max-pooled block are fixed for the sample (its gaps are held instead)."""
        return layer >= self.shift or self.layers[layer][0] == "conv"

    def flipped(self, layer: int, z: list[np.ndarray], pattern: list[np.ndarray]) -> np.ndarray:
        """Units of ``layer`` that left the region ``pattern`` at the point whose pre-activations (every
        layer, :meth:`preacts`) are ``z``, where that changes the forward pass: a conv unit of a max-pooled
        block only as a window max; a window gap only when the unit that overtook the max fires."""
        out = ((z[layer] > 0) != (pattern[layer] > 0)) & self.watched(layer)
        if layer < self.shift and self.layers[layer][0] == "gap":
            i = self.layers[layer][1]
            out &= z[self.conv_layer[i]][self.gaps[i][1]] > 0
        return np.nonzero(out)[0]

    def preacts(self, x: np.ndarray, f32: bool = False) -> list[np.ndarray]:
        if not self.stack.blocks:
            return self.head.preacts(x, f32=f32)
        out, f = self.conv_preacts(x, f32)
        out += self.head.preacts(f, f32=f32)
        return [z[0] for z in out] if np.ndim(x) == 1 else out

    def conv_preacts(self, x: np.ndarray, f32: bool = False) -> tuple[list[np.ndarray], np.ndarray]:
        """The conv layers' pre-activations (rows per input) and the head inputs (features)."""
        zs, f = self.stack.forward(x, f32)
        out = []
        for kind, i in self.layers:
            z = zs[i].reshape(zs[i].shape[0], -1)
            if kind == "gap":
                _, hi, lo = self._dev[i]
                z = z[:, hi] - z[:, lo]
            out.append(z.cpu().numpy())
        return out, f.cpu().numpy()

    def checked_preacts(self, x: np.ndarray, units: np.ndarray, levels: np.ndarray,
                        near: float) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """:meth:`preacts` of one input in float64 and float32 (the client's), the float64 values of the head's
        last layer computed where the checks need them (:meth:`HeadArrays.checked_preacts`: the ``units`` near
        their ``levels`` and those within ``near`` of zero)."""
        x32 = x.astype(np.float32)
        if not self.stack.blocks:
            return self.head.checked_preacts(x, x32, units, levels, near)
        c64, f64 = self.conv_preacts(x)
        c32, f32 = self.conv_preacts(x32, True)
        h64, h32 = self.head.checked_preacts(f64[0], f32[0], units, levels, near)
        return [z[0] for z in c64] + h64, [z[0] for z in c32] + h32

    def _mask(self, pattern: list[np.ndarray], i: int) -> torch.Tensor:
        return torch.from_numpy(pattern[self.conv_layer[i]]).to(device=self.stack.device, dtype=torch.float64)

    def _pool(self, i: int, a: torch.Tensor) -> torch.Tensor:
        """The block's pooling, linear in the region: (n x conv_dim) -> (n x out_dim)."""
        blk = self.stack.blocks[i]
        if blk.pool is None:
            return a
        if self._dev[i] is not None:
            return a[:, self._dev[i][0]]
        return blk.pool.apply(a.reshape(-1, *blk.conv_shape)).reshape(a.shape[0], -1)

    def _unpool(self, i: int, g: torch.Tensor) -> torch.Tensor:
        """The transpose of :meth:`_pool`: (n x out_dim) -> (n x conv_dim)."""
        blk = self.stack.blocks[i]
        if blk.pool is None:
            return g
        full = torch.zeros(g.shape[0], *blk.conv_shape, dtype=g.dtype, device=g.device)
        if self._dev[i] is not None:
            full = full.reshape(g.shape[0], -1)
            full[:, self._dev[i][0]] = g
            return full
        ky, kx = blk.pool.kernel
        up = g.reshape(-1, *blk.out_shape).repeat_interleave(ky, 2).repeat_interleave(kx, 3) / (ky * kx)
        full[:, :, : up.shape[2], : up.shape[3]] = up
        return full.reshape(g.shape[0], -1)

    def offsets(self, pattern: list[np.ndarray]) -> list:
        """Per layer, the affine offsets inside the region ``pattern`` (the pre-activations of a zero input);
        the head's layers are read by index (:class:`HeadOffsets`)."""
        if not self.stack.blocks:
            return self.head.offsets(pattern)
        out = []
        with torch.no_grad():  # the pass of the input 0 (through the model's input map, if any)
            a = self.stack.tensor(np.zeros(self.stack.net.input_dim), torch.float64)
            for i, blk in enumerate(self.stack.blocks):
                z = blk.preact(a, torch.float64).reshape(1, -1)
                out.append(z[0].cpu().numpy())
                if self._dev[i] is not None:
                    _, hi, lo = self._dev[i]
                    out.append((z[0, hi] - z[0, lo]).cpu().numpy())
                a = self._pool(i, z * self._mask(pattern, i)).reshape(1, *blk.out_shape)
        return out + self.head.offsets(pattern[self.shift:], a.reshape(-1).cpu().numpy())

    def rows(self, layer: int, neurons: np.ndarray, pattern: list[np.ndarray]) -> np.ndarray:
        """``J`` rows (k x input_dim) of the given neurons of ``layer`` inside the region ``pattern``."""
        neurons = np.asarray(neurons, dtype=np.int64)
        if layer >= self.shift:
            R = self.head.rows(layer - self.shift, neurons, pattern[self.shift:])
            if not self.stack.blocks:
                return R
            return self._pull_back(R, len(self.stack.blocks) - 1, pattern, at_output=True)
        kind, i = self.layers[layer]
        dim = self.stack.blocks[i].conv_dim
        if kind == "conv":
            R = _onehot(neurons, dim)
        else:
            hi, lo = self.gaps[i]
            R = _onehot(hi[neurons], dim) - _onehot(lo[neurons], dim)
        return self._pull_back(R, i, pattern, at_output=False)

    def _pull_back(self, R: np.ndarray, block: int, pattern: list[np.ndarray], at_output: bool) -> np.ndarray:
        """Rows ``R`` over block ``block``'s output (``at_output``) or its conv pre-activations, pulled back
        to the input through the masked linear conv stack (transposed convs)."""
        with torch.no_grad():
            g = torch.from_numpy(np.ascontiguousarray(R)).to(device=self.stack.device, dtype=torch.float64)
            n = g.shape[0]
            for i in range(block, -1, -1):
                blk = self.stack.blocks[i]
                if at_output or i < block:
                    g = self._unpool(i, g.reshape(n, -1)) * self._mask(pattern, i)
                W, _ = blk.folded(torch.float64)
                g = blk.conv.geometry.transposed((n, *blk.in_shape), W, g.reshape(n, *blk.conv_shape))
            return self.stack.input_rows(g.reshape(n, -1))
