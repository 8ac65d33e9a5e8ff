"""Convolutional ReLU networks: typed layer specs of a user's ``nn.Sequential`` CNN, and a builder.

A CNN fedleak's exact attacks understand is a stack of *conv blocks* followed by a fully connected head::

    ( Conv2d [BatchNorm2d (eval)] ReLU [MaxPool2d | AvgPool2d] )+  Flatten  Linear (ReLU Linear)+

Every block is, per sample, ``out = pool(relu(A x + c))`` with ``A`` the unrolled (sparse) convolution,
eval-mode batch norm folded in. :meth:`ConvBlock.affine` returns ``A`` (scipy CSR, float64, unit order
``(channel, y, x)`` like torch's flatten) and ``c``; :meth:`ConvBlock.pool_matrix` the average-pooling
matrix, :meth:`ConvBlock.pool_windows` the max-pooling windows. Anything else is refused with a
:class:`~fedleak.errors.ModelError` naming the layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from fedleak.errors import ModelError
from fedleak.models.conv_gram import MAX_ENTRIES, ConvGram
from fedleak.models.structure import DenseSpec, ReluMLP, _leaves


def _pair(v, what: str, name: str) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) for i in v):
        return (int(v[0]), int(v[1]))
    raise ModelError(f"layer '{name}': unsupported {what} {v!r}")


@dataclass(frozen=True)
class ConvSpec:
    """An ``nn.Conv2d`` (groups=1, dilation=1, zero padding) and its parameter names."""

    name: str
    module: nn.Conv2d
    weight_name: str
    bias_name: str | None
    padding: tuple[int, int]


@dataclass(frozen=True)
class BatchNormSpec:
    """An eval-mode ``nn.BatchNorm2d`` (running statistics), folded into the conv before it."""

    name: str
    module: nn.BatchNorm2d
    weight_name: str | None
    bias_name: str | None


@dataclass(frozen=True)
class PoolSpec:
    """Non-overlapping max or average pooling (kernel == stride, no padding)."""

    name: str
    kind: str  # "max" or "avg"
    kernel: tuple[int, int]


@dataclass(frozen=True)
class ConvBlock:
    """``pool(relu(bn(conv(x))))`` with the shapes (C, H, W) of its input, conv output and output."""

    conv: ConvSpec
    bn: BatchNormSpec | None
    pool: PoolSpec | None
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

    def folded(self, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight (C_out x C_in x kh x kw) and bias (C_out) of conv with eval-mode BN folded in."""
        W = self.conv.module.weight.detach().to(dtype)
        b = (torch.zeros(W.shape[0], dtype=dtype) if self.conv.module.bias is None
             else self.conv.module.bias.detach().to(dtype))
        if self.bn is not None:
            bn = self.bn.module
            scale = 1.0 / torch.sqrt(bn.running_var.detach().to(dtype) + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight.detach().to(dtype)
            shift = -bn.running_mean.detach().to(dtype) * scale
            if bn.bias is not None:
                shift = shift + bn.bias.detach().to(dtype)
            W = W * scale[:, None, None, None]
            b = b * scale + shift
        return W, b

    def preact(self, x: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
        """Pre-activations (n x C x H x W) of the conv (BN folded) for inputs ``x`` (n x in_shape)."""
        W, b = self.folded(dtype)
        return torch.nn.functional.conv2d(x.to(dtype).reshape(-1, *self.in_shape), W, b, padding=self.conv.padding,
                                          stride=self.conv.module.stride)

    def apply_pool(self, a: torch.Tensor) -> torch.Tensor:
        if self.pool is None:
            return a
        fn = torch.nn.functional.max_pool2d if self.pool.kind == "max" else torch.nn.functional.avg_pool2d
        return fn(a, self.pool.kernel, self.pool.kernel)

    def forward(self, x: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
        return self.apply_pool(torch.relu(self.preact(x, dtype)))

    @cached_property
    def affine(self) -> tuple[sp.csr_matrix, np.ndarray]:
        """The unrolled conv (BN folded) ``A`` (conv_dim x in_dim, CSR float64) and bias ``c`` (conv_dim)."""
        W, b = self.folded(torch.float64)
        W = W.numpy()
        co_n, ci_n, kh, kw = W.shape
        _, H, Wd = self.in_shape
        _, Ho, Wo = self.conv_shape
        sy, sx = self.conv.module.stride
        py, px = self.conv.padding
        co, oy, ox, ci, ky, kx = np.meshgrid(np.arange(co_n), np.arange(Ho), np.arange(Wo), np.arange(ci_n),
                                             np.arange(kh), np.arange(kw), indexing="ij")
        iy = oy * sy - py + ky
        ix = ox * sx - px + kx
        ok = (iy >= 0) & (iy < H) & (ix >= 0) & (ix < Wd)
        rows = ((co * Ho + oy) * Wo + ox)[ok]
        cols = ((ci * H + iy) * Wd + ix)[ok]
        vals = W[co[ok], ci[ok], ky[ok], kx[ok]]
        A = sp.csr_matrix((vals, (rows, cols)), shape=(self.conv_dim, self.in_dim))
        c = np.repeat(b.numpy(), Ho * Wo)
        return A, c

    @cached_property
    def gram(self) -> ConvGram | None:
        """Band assembly of ``A^T diag(w) A`` (:class:`~fedleak.models.conv_gram.ConvGram`), or None when its
        index arrays would be too large (the caller then forms the product from ``affine``)."""
        W, _ = self.folded(torch.float64)
        out_hw = self.conv_shape[1:]
        if ConvGram.entries(tuple(W.shape), out_hw) > MAX_ENTRIES:
            return None
        return ConvGram(W.numpy(), self.in_shape, out_hw, tuple(self.conv.module.stride), self.conv.padding)

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
        return sp.csr_matrix((np.full(rows.shape, 1.0 / k), (rows, win.ravel())), shape=(win.shape[0], self.conv_dim))

    def parameter_names(self) -> list[str]:
        names = [self.conv.weight_name] + ([self.conv.bias_name] if self.conv.bias_name else [])
        if self.bn is not None:
            names += [n for n in (self.bn.weight_name, self.bn.bias_name) if n]
        return names


@dataclass(frozen=True)
class ReluCNN:
    """A parsed CNN: conv ``blocks`` then the fully connected ReLU ``head`` (a :class:`ReluMLP` whose
    parameter names are those of the whole model, so the head attack reads the model's gradient dict)."""

    blocks: tuple[ConvBlock, ...]
    head: ReluMLP
    input_shape: tuple[int, int, int]

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        return self.blocks[-1].out_shape

    @property
    def feature_dim(self) -> int:
        return self.head.input_dim

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def features(self, x: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
        """Flattened input of the first Linear layer (n x feature_dim)."""
        a = x.to(dtype).reshape(-1, *self.input_shape)
        for blk in self.blocks:
            a = blk.forward(a, dtype)
        return a.reshape(a.shape[0], -1)

    def parameter_names(self) -> list[str]:
        names = [n for blk in self.blocks for n in blk.parameter_names()]
        return names + self.head.parameter_names()


def _conv_spec(name: str, m: nn.Conv2d) -> ConvSpec:
    p = f"{name}." if name else ""
    if m.groups != 1:
        raise ModelError(f"layer '{name}' (Conv2d): grouped convolutions (groups={m.groups}) are not supported")
    if tuple(m.dilation) != (1, 1):
        raise ModelError(f"layer '{name}' (Conv2d): dilation {tuple(m.dilation)} is not supported")
    if m.padding_mode != "zeros":
        raise ModelError(f"layer '{name}' (Conv2d): padding_mode '{m.padding_mode}' is not supported (zeros only)")
    if isinstance(m.padding, str):
        if m.padding == "valid":
            pad = (0, 0)
        else:  # "same" with stride 1
            kh, kw = m.kernel_size
            if kh % 2 == 0 or kw % 2 == 0:
                raise ModelError(f"layer '{name}' (Conv2d): padding='same' with an even kernel is not supported")
            pad = (kh // 2, kw // 2)
    else:
        pad = _pair(tuple(m.padding), "padding", name)
    return ConvSpec(name, m, f"{p}weight", f"{p}bias" if m.bias is not None else None, pad)


def _pool_spec(name: str, m: nn.Module) -> PoolSpec:
    kind = "max" if isinstance(m, nn.MaxPool2d) else "avg"
    kernel = _pair(m.kernel_size, "kernel_size", name)
    stride = _pair(m.stride if m.stride is not None else m.kernel_size, "stride", name)
    if stride != kernel:
        raise ModelError(f"layer '{name}' ({type(m).__name__}): only non-overlapping pooling (stride == kernel) is supported")
    if _pair(m.padding, "padding", name) != (0, 0) or m.ceil_mode:
        raise ModelError(f"layer '{name}' ({type(m).__name__}): padding and ceil_mode are not supported")
    if kind == "max" and (_pair(m.dilation, "dilation", name) != (1, 1) or m.return_indices):
        raise ModelError(f"layer '{name}' (MaxPool2d): dilation and return_indices are not supported")
    if kind == "avg" and getattr(m, "divisor_override", None) is not None:
        raise ModelError(f"layer '{name}' (AvgPool2d): divisor_override is not supported")
    return PoolSpec(name, kind, kernel)


def _out_hw(n: int, k: int, s: int, p: int) -> int:
    return (n + 2 * p - k) // s + 1


def as_relu_cnn(model: nn.Module, input_shape: Sequence[int] | None = None) -> ReluCNN:
    """Describe ``model``, an ``nn.Sequential`` CNN of the form in the module docstring.

    ``input_shape`` (C, H, W) comes from the argument or ``model.input_shape``. Raises
    :class:`ModelError` naming the first layer that does not fit.
    """
    if not isinstance(model, nn.Sequential):
        raise ModelError(
            f"fedleak needs a torch.nn.Sequential model to know the order of its layers; got {type(model).__name__}"
        )
    shape = input_shape if input_shape is not None else getattr(model, "input_shape", None)
    if shape is None:
        raise ModelError("the CNN's input shape (C, H, W) is unknown: pass input_shape or set model.input_shape")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) <= 0:
        raise ModelError(f"a CNN input shape must be (C, H, W), got {shape}")
    leaves = [(n, m) for n, m in _leaves(model, "") if not isinstance(m, nn.Identity)]
    blocks: list[ConvBlock] = []
    cur = shape
    i = 0
    while i < len(leaves) and not isinstance(leaves[i][1], nn.Flatten):
        name, m = leaves[i]
        if not isinstance(m, nn.Conv2d):
            raise ModelError(
                f"layer '{name}' ({type(m).__name__}) is not supported here: each conv block is "
                "Conv2d [BatchNorm2d] ReLU [MaxPool2d|AvgPool2d]"
            )
        conv = _conv_spec(name, m)
        if m.in_channels != cur[0]:
            raise ModelError(f"layer '{name}' takes {m.in_channels} channels but gets {cur[0]}")
        kh, kw = m.kernel_size
        sy, sx = m.stride
        ho, wo = _out_hw(cur[1], kh, sy, conv.padding[0]), _out_hw(cur[2], kw, sx, conv.padding[1])
        if ho <= 0 or wo <= 0:
            raise ModelError(f"layer '{name}': the input {cur} is too small for the kernel")
        conv_shape = (m.out_channels, ho, wo)
        i += 1
        bn = None
        if i < len(leaves) and isinstance(leaves[i][1], nn.BatchNorm2d):
            bname, bm = leaves[i]
            if bm.training or not bm.track_running_stats or bm.running_mean is None:
                raise ModelError(
                    f"layer '{bname}' (BatchNorm2d): batch norm in training mode couples the samples of a batch; "
                    "only eval-mode batch norm with running statistics is supported (call model.eval())"
                )
            p = f"{bname}." if bname else ""
            bn = BatchNormSpec(bname, bm, f"{p}weight" if bm.weight is not None else None,
                               f"{p}bias" if bm.bias is not None else None)
            i += 1
        if i >= len(leaves) or not isinstance(leaves[i][1], nn.ReLU):
            got = "the end of the model" if i >= len(leaves) else f"layer '{leaves[i][0]}' ({type(leaves[i][1]).__name__})"
            raise ModelError(f"conv layer '{name}' must be followed by a ReLU; got {got}")
        i += 1
        pool = None
        out_shape = conv_shape
        if i < len(leaves) and isinstance(leaves[i][1], (nn.MaxPool2d, nn.AvgPool2d)):
            pool = _pool_spec(*leaves[i])
            out_shape = (conv_shape[0], conv_shape[1] // pool.kernel[0], conv_shape[2] // pool.kernel[1])
            if min(out_shape) <= 0:
                raise ModelError(f"layer '{leaves[i][0]}': the pooling window is larger than its input")
            i += 1
        blocks.append(ConvBlock(conv, bn, pool, cur, conv_shape, out_shape))
        cur = out_shape
    if not blocks:
        raise ModelError("the model has no Conv2d layer (use the MLP attacks for fully connected networks)")
    if i >= len(leaves):
        raise ModelError("the CNN must flatten its features (nn.Flatten) before the fully connected head")
    fname, flat = leaves[i]
    if flat.start_dim != 1 or flat.end_dim != -1:
        raise ModelError(f"layer '{fname}' (Flatten): only Flatten(start_dim=1, end_dim=-1) is supported")
    head_leaves = leaves[i + 1:]
    dense: list[DenseSpec] = []
    for k, (name, m) in enumerate(head_leaves):
        want = nn.Linear if k % 2 == 0 else nn.ReLU
        if not isinstance(m, want):
            raise ModelError(
                f"layer '{name}' ({type(m).__name__}) is not supported in the head: after Flatten the model "
                "alternates Linear and ReLU and ends with a Linear layer"
            )
        if isinstance(m, nn.Linear):
            p = f"{name}." if name else ""
            dense.append(DenseSpec(name, m, f"{p}weight", f"{p}bias" if m.bias is not None else None))
    if not head_leaves or not isinstance(head_leaves[-1][1], nn.Linear):
        raise ModelError("the model must end with a Linear layer (the logits)")
    if len(dense) < 2:
        raise ModelError(
            f"the fully connected head has no hidden ReLU layer (layer '{dense[0].name}' maps the features straight "
            "to the logits); the CNN exclusivity attack needs at least one hidden Linear+ReLU layer after Flatten"
        )
    if dense[0].in_features != math.prod(cur):
        raise ModelError(f"layer '{dense[0].name}' takes {dense[0].in_features} inputs but the conv features have "
                         f"{math.prod(cur)} values (shape {cur})")
    for prev, nxt in zip(dense, dense[1:]):
        if prev.out_features != nxt.in_features:
            raise ModelError(f"layer '{nxt.name}' takes {nxt.in_features} inputs but layer '{prev.name}' gives "
                             f"{prev.out_features}")
    return ReluCNN(blocks=tuple(blocks), head=ReluMLP(dense=tuple(dense), input_shape=None), input_shape=shape)


def is_cnn(model: nn.Module) -> bool:
    """True when ``model`` holds a Conv2d layer (what the lead's dispatch checks)."""
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


class ConvNet(nn.Sequential):
    """``nn.Sequential`` CNN that remembers its input shape (C, H, W)."""

    def __init__(self, layers: Sequence[nn.Module], input_shape: tuple[int, ...]):
        super().__init__(*layers)
        self.input_shape = tuple(input_shape)


def make_convnet(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    channels: Sequence[int] = (8, 16),
    kernel: int = 3,
    padding: int = 0,
    pool: str | None = None,
    pool_layers: Sequence[int] | None = None,
    fc_widths: Sequence[int] = (512,),
    batch_norm: bool = False,
    bias: bool = True,
    seed: int = 0,
) -> ConvNet:
    """A ConvNet: per entry of ``channels`` a ``Conv2d(kernel, stride 1, padding) ReLU [pool]`` block, then
    ``Flatten`` and a ReLU head of ``fc_widths`` with ``num_classes`` outputs. PyTorch's default init, seeded.

    ``pool`` is None, ``"avg"`` or ``"max"`` (2x2); it follows the blocks listed in ``pool_layers``
    (0-based; default: every block). ``batch_norm`` inserts an eval-mode BatchNorm2d after each conv
    (with seeded, non-trivial running statistics, as after training).
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) <= 0:
        raise ModelError(f"make_convnet needs a positive input shape (C, H, W), got {shape}")
    if num_classes < 2:
        raise ModelError(f"a classifier needs at least 2 classes, got {num_classes}")
    if not channels or min(int(c) for c in channels) <= 0:
        raise ModelError(f"channels must be a non-empty list of positive sizes, got {list(channels)}")
    if not fc_widths or min(int(w) for w in fc_widths) <= 0:
        raise ModelError(f"fc_widths must hold at least one positive width, got {list(fc_widths)}")
    if pool not in (None, "avg", "max"):
        raise ModelError(f"pool must be None, 'avg' or 'max', got {pool!r}")
    pooled = set(range(len(channels))) if pool_layers is None else {int(p) for p in pool_layers}
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        layers: list[nn.Module] = []
        c, h, w = shape
        for k, co in enumerate(int(c) for c in channels):
            layers.append(nn.Conv2d(c, co, kernel, padding=padding, bias=bias))
            h, w = h + 2 * padding - kernel + 1, w + 2 * padding - kernel + 1
            if batch_norm:
                bn = nn.BatchNorm2d(co)
                with torch.no_grad():
                    bn.running_mean.uniform_(-0.1, 0.1)
                    bn.running_var.uniform_(0.5, 2.0)
                    bn.weight.uniform_(0.5, 1.5)
                    bn.bias.uniform_(-0.1, 0.1)
                layers.append(bn)
            layers.append(nn.ReLU())
            if pool is not None and k in pooled:
                layers.append(nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2))
                h, w = h // 2, w // 2
            if h <= 0 or w <= 0:
                raise ModelError(f"the input {shape} is too small for {len(channels)} conv blocks")
            c = co
        layers.append(nn.Flatten())
        sizes = [c * h * w, *[int(x) for x in fc_widths], num_classes]
        for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
            layers.append(nn.Linear(n_in, n_out, bias=bias))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        net = ConvNet(layers, shape)
        return net.eval() if batch_norm else net
    finally:
        torch.random.set_rng_state(state)
