"""The converters of the ops fedleak's exact methods understand, one per kind of layer.

Each takes an :class:`~fedleak.nets.ops.Op` and returns a typed layer (or ``None`` for the identity), or
raises the op's refusal naming what does not fit and what to do. Module, functional and in-place twins
(``nn.ReLU``, ``F.relu``, ``torch.relu``, ``x.relu_()``) share one converter.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from fedleak.nets.layers import BatchNorm, Conv, Dense, Dropout, Layer, Pad, Pool, Relu, Reshape
from fedleak.nets.ops import EXACT_SCOPE, Op, ParameterRead, converts, unsupported


def _pair(op: Op, value: object, what: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    raise op.refuse(f"unsupported {what} {value!r}")


def _flat_input(op: Op) -> None:
    if len(op.in_shape) != 1:
        raise op.refuse(f"a Linear layer on a {op.in_shape} input acts on its last dimension only; flatten each "
                        "sample first (nn.Flatten, torch.flatten(x, 1) or x.view(x.size(0), -1))")


@converts(nn.Linear)
def linear(op: Op) -> Dense:
    _flat_input(op)
    bias = op.parameter("bias")
    return Dense(op.node, op.module, op.parameter("weight"), bias, bias_attr="bias" if bias else None)


@converts(F.linear)
def functional_linear(op: Op) -> Dense:
    """``F.linear(x, self.w, self.b)`` of the model's own parameters, as they are, held by one module."""
    weight, bias = op.arg(0, "weight"), op.arg(1, "bias")
    if not isinstance(weight, ParameterRead) or not (bias is None or isinstance(bias, ParameterRead)):
        raise op.refuse("F.linear is read where its weight and bias are parameters of the model as they are "
                        "(F.linear(x, self.w, self.b)); here one is computed (a transpose, a slice, a product): hold "
                        f"them in an nn.Linear layer; {EXACT_SCOPE}")
    if bias is not None and bias.owner is not weight.owner:
        raise op.refuse(f"its weight '{weight.name}' and bias '{bias.name}' are held by different modules; hold them "
                        f"in one (or in an nn.Linear layer); {EXACT_SCOPE}")
    _flat_input(op)
    return Dense(op.node, weight.owner, weight.name, bias.name if bias else None, weight_attr=weight.attr,
                 bias_attr=bias.attr if bias else None, functional=True)


def _sizes(op: Op, value: object, what: str, along: int = 1) -> tuple[int, int]:
    """A conv's or pool's 2-D size, stride, padding or dilation; over (C, L) signals, a 1-D one's ``k`` as
    ``(along, k)`` of (C, 1, L) maps (``along``: 1, or 0 for padding)."""
    if len(op.in_shape) != 2:
        return _pair(op, value, what)
    if isinstance(value, (tuple, list)) and len(value) == 1:
        value = value[0]
    if isinstance(value, int):
        return (along, int(value))
    raise op.refuse(f"unsupported {what} {value!r}")


def _geometry(op: Op, kernel: tuple[int, ...], stride: object, padding: object, dilation: object, groups: int,
              padding_mode: str = "zeros") -> tuple[tuple[int, int], tuple[int, int], tuple[int, int] | None]:
    """A convolution's padding, stride and padding after (None: the same as before) as a 2-D one's
    (:func:`_sizes`), or its refusal: groups 1, dilation 1, zero padding ('same' with an even kernel pads one more
    zero after than before, as torch does)."""
    if groups != 1:
        raise op.refuse(f"grouped convolutions (groups={groups}) are not supported")
    dilations = dilation if isinstance(dilation, (tuple, list)) else (dilation,)
    if set(dilations) != {1}:
        raise op.refuse(f"dilation {dilation} is not supported")
    if padding_mode != "zeros":
        raise op.refuse(f"padding_mode '{padding_mode}' is not supported (zero padding only)")
    after = None
    if padding == "valid":
        pad = (0, 0)
    elif padding == "same":
        pad = _sizes(op, tuple((k - 1) // 2 for k in kernel), "padding", along=0)
        after = _sizes(op, tuple(k // 2 for k in kernel), "padding", along=0)
    else:
        pad = _sizes(op, tuple(padding) if isinstance(padding, (tuple, list)) else padding, "padding", along=0)
    return pad, _sizes(op, tuple(stride) if isinstance(stride, (tuple, list)) else stride, "stride"), \
        (None if after == pad else after)


@converts(nn.Conv2d, nn.Conv1d)
def conv(op: Op) -> Conv:
    """A 2-D convolution, or a 1-D one read as a 2-D convolution of (C, 1, L) maps with 1 x k kernels."""
    m = op.module
    pad, stride, after = _geometry(op, tuple(m.kernel_size), m.stride, m.padding, m.dilation, m.groups,
                                   m.padding_mode)
    bias = op.parameter("bias")
    return Conv(op.node, m, op.parameter("weight"), bias, bias_attr="bias" if bias else None, padding=pad,
                stride=stride, after=after)


@converts(F.conv1d, F.conv2d)
def functional_conv(op: Op) -> Conv:
    """``F.conv2d(x, self.k, self.b, stride, padding)`` (or ``F.conv1d``) of the model's own parameters, as they
    are, held by one module: read as the ``nn.Conv2d`` (``nn.Conv1d``) that holds them would be."""
    weight, bias = op.arg(0, "weight"), op.arg(1, "bias")
    if not isinstance(weight, ParameterRead) or not (bias is None or isinstance(bias, ParameterRead)):
        raise op.refuse(f"{op.what} is read where its kernel and bias are parameters of the model as they are "
                        f"({op.what}(x, self.k, self.b)); here one is computed (a product, a view, a standardised "
                        f"kernel): hold them in an nn.Conv2d (nn.Conv1d) layer; {EXACT_SCOPE}")
    if bias is not None and bias.owner is not weight.owner:
        raise op.refuse(f"its kernel '{weight.name}' and bias '{bias.name}' are held by different modules; hold them "
                        f"in one (or in an nn.Conv2d layer); {EXACT_SCOPE}")
    kernel = tuple(int(k) for k in getattr(weight.owner, weight.attr).shape[2:])
    pad, stride, after = _geometry(op, kernel, op.arg(2, "stride", 1), op.arg(3, "padding", 0),
                                   op.arg(4, "dilation", 1), op.arg(5, "groups", 1))
    return Conv(op.node, weight.owner, weight.name, bias.name if bias else None, weight_attr=weight.attr,
                bias_attr=bias.attr if bias else None, functional=True, padding=pad, stride=stride, after=after)


@converts(nn.BatchNorm2d, nn.BatchNorm1d)
def batch_norm(op: Op) -> BatchNorm:
    m = op.module
    if isinstance(m, nn.BatchNorm1d) and len(op.in_shape) != 2:
        raise op.refuse("BatchNorm1d is a layer of this chain only after a Conv1d, on (C, L) maps; on flat features "
                        "the exact methods take out an eval-mode one with running statistics that reads a Linear "
                        "layer's output alone (folded into that layer), one after a ReLU that only a Linear layer "
                        "with a bias reads (through eval-mode Dropout at most; folded into that layer), or the "
                        "model's input through reshapes only, read by the first Linear layer alone (read as a map of "
                        "it; fedleak.nets.dense_norms.fold_dense_norms(model).model is what they read), not one "
                        f"after arithmetic on the input; {EXACT_SCOPE}")
    if m.training or not m.track_running_stats or m.running_mean is None:
        raise op.refuse("batch norm in training mode couples the samples of a batch; only eval-mode batch norm "
                        "with running statistics is supported (call model.eval())")
    return BatchNorm(op.node, m, op.parameter("weight"), op.parameter("bias"))


@converts(nn.ReLU, F.relu, torch.relu, torch.relu_, ("method", "relu"), ("method", "relu_"))
def relu(op: Op) -> Relu:
    return Relu(op.node)


@converts(nn.Threshold, F.threshold, torch.threshold, torch.threshold_)
def threshold(op: Op) -> Relu:
    """``nn.Threshold(0, 0)`` (``F.threshold(x, 0, 0)``): ``x`` where ``x > 0``, else 0, and its gradient passes where
    ``x > 0`` only: a ReLU. Another threshold or value is no ReLU: refused."""
    cut = op.module.threshold if op.module is not None else op.arg(0, "threshold")
    value = op.module.value if op.module is not None else op.arg(1, "value")
    if not (isinstance(cut, (int, float)) and isinstance(value, (int, float)) and cut == 0 and value == 0):
        raise op.refuse(f"a threshold at {cut} with the value {value} below it is not a ReLU (only threshold 0, value "
                        f"0 is); {EXACT_SCOPE}")
    return Relu(op.node)


@converts(torch.clamp, torch.clamp_min, torch.clip, *(("method", m) for m in ("clamp", "clamp_", "clamp_min",
                                                                           "clamp_min_", "clip", "clip_")))
def clamp(op: Op) -> Layer:
    """``x.clamp(min=0)`` computes a ReLU but differentiates otherwise: its gradient passes where the input is exactly
    0 (a zero bias on a black border does it), which the exact methods' ReLU model does not: refused, saying so."""
    low, high = op.arg(0, "min"), op.arg(1, "max")
    if isinstance(low, (int, float)) and low == 0 and high is None:
        raise op.refuse("clamp(min=0) is a ReLU whose gradient also passes where its input is exactly 0 (torch's "
                        "clamp keeps the boundary), which fedleak's exact methods do not model: write F.relu (or "
                        f"nn.ReLU), which computes the same values; {EXACT_SCOPE}")
    raise unsupported(op)


def _pool(op: Op, kind: str, kernel: object, stride: object, padding: object, ceil_mode: bool,
          dilation: object = 1, extra: bool = False) -> Pool:
    k = _sizes(op, kernel, "kernel_size")
    if _sizes(op, stride if stride not in (None, []) else kernel, "stride") != k:
        raise op.refuse("only non-overlapping pooling (stride == kernel_size) is supported")
    if _sizes(op, padding, "padding", along=0) != (0, 0) or ceil_mode:
        raise op.refuse("padding and ceil_mode are not supported in pooling")
    if _sizes(op, dilation, "dilation") != (1, 1) or extra:
        raise op.refuse("dilation, return_indices and divisor_override are not supported in pooling")
    return Pool(op.node, kind, k)


@converts(nn.MaxPool2d, nn.MaxPool1d)
def max_pool_module(op: Op) -> Pool:
    m = op.module
    return _pool(op, "max", m.kernel_size, m.stride, m.padding, m.ceil_mode, m.dilation, m.return_indices)


@converts(nn.AvgPool2d, nn.AvgPool1d)
def avg_pool_module(op: Op) -> Pool:
    m = op.module
    return _pool(op, "avg", m.kernel_size, m.stride, m.padding, m.ceil_mode,
                 extra=getattr(m, "divisor_override", None) is not None or not m.count_include_pad and m.padding != 0)


@converts(F.max_pool2d, torch.max_pool2d, F.max_pool1d, torch.max_pool1d)
def max_pool_function(op: Op) -> Pool:
    return _pool(op, "max", op.arg(0, "kernel_size"), op.arg(1, "stride"), op.arg(2, "padding", 0),
                 op.arg(4, "ceil_mode", False), op.arg(3, "dilation", 1), op.arg(5, "return_indices", False))


@converts(F.avg_pool2d, F.avg_pool1d)
def avg_pool_function(op: Op) -> Pool:
    return _pool(op, "avg", op.arg(0, "kernel_size"), op.arg(1, "stride"), op.arg(2, "padding", 0),
                 op.arg(3, "ceil_mode", False), extra=op.arg(5, "divisor_override") is not None)


@converts(nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d)
def adaptive_pool(op: Op) -> Pool | None:
    """A fixed-output adaptive pool is an ordinary pool when the output size divides the input size."""
    if len(op.in_shape) != 3:
        raise op.refuse(f"adaptive pooling of a {op.in_shape} input is not supported (expected C x H x W)")
    _, h, w = op.in_shape
    _, ho, wo = op.out_shape
    if (ho, wo) == (h, w):
        return None
    if h % ho or w % wo:
        raise op.refuse(f"adaptive pooling from {h}x{w} to {ho}x{wo} uses overlapping or uneven windows; only "
                        "output sizes that divide the input size are supported")
    is_max = isinstance(op.module, nn.AdaptiveMaxPool2d) or "max" in op.what
    return Pool(op.node, "max" if is_max else "avg", (h // ho, w // wo))


@converts(torch.mean, ("method", "mean"))
def global_avg_pool(op: Op) -> Pool:
    """A mean over every position of each map at once, ``x.mean((2, 3))``: global average pooling, the pool of one
    window the size of the map (``nn.AdaptiveAvgPool2d(1)``)."""
    return _global_pool(op, "avg")


@converts(torch.amax, ("method", "amax"))
def global_max_pool(op: Op) -> Pool:
    """``x.amax((2, 3))``: global max pooling (``nn.AdaptiveMaxPool2d(1)``)."""
    return _global_pool(op, "max")


def _global_pool(op: Op, kind: str) -> Pool:
    dims = op.arg(0, "dim")
    maps = len(op.in_shape) - 1  # (C, H, W) maps, or (C, L) signals
    if op.arg(2, "dtype") is not None or maps not in (1, 2):
        raise op.refuse(f"a reduction of a {op.in_shape} input is read only as global pooling of (C, H, W) maps "
                        "or (C, L) signals (x.mean((2, 3)), x.mean(-1)), without a dtype")
    dims = dims if isinstance(dims, (tuple, list)) else (dims,)
    rank = len(op.in_shape) + 1
    if not all(isinstance(d, int) for d in dims) or sorted(d % rank for d in dims) != list(range(2, rank)):
        raise op.refuse(f"reduces dimensions {dims} of a batch of {op.in_shape} inputs; only a reduction over every "
                        f"position of each map at once is read, global pooling ({tuple(range(2, rank))})")
    window = (1, op.in_shape[1]) if maps == 1 else (op.in_shape[1], op.in_shape[2])
    return Pool(op.node, kind, window)


@converts(nn.Flatten, nn.Unflatten, torch.flatten, torch.reshape, torch.unsqueeze, torch.squeeze,
          ("method", "view"), ("method", "reshape"), ("method", "flatten"), ("method", "unsqueeze"),
          ("method", "squeeze"))
def reshape(op: Op) -> Reshape | None:
    if math.prod(op.out_shape) != math.prod(op.in_shape):
        raise op.refuse(f"reshapes each {op.in_shape} sample to {op.out_shape}, which mixes samples of the batch; "
                        "keep the batch dimension (e.g. x.view(x.size(0), -1))")
    return None if op.out_shape == op.in_shape else Reshape(op.node, op.out_shape)


# the padding modules' modes, as F.pad names them
PAD_MODES = {nn.ZeroPad1d: "constant", nn.ZeroPad2d: "constant", nn.ConstantPad1d: "constant",
             nn.ConstantPad2d: "constant", nn.ReflectionPad1d: "reflect", nn.ReflectionPad2d: "reflect",
             nn.ReplicationPad1d: "replicate", nn.ReplicationPad2d: "replicate", nn.CircularPad1d: "circular",
             nn.CircularPad2d: "circular"}


@converts(*PAD_MODES, F.pad)
def pad(op: Op) -> Pad | None:
    """Zero padding of maps or signals (``nn.ZeroPad2d(2)``, ``F.pad(x, (2, 2, 2, 2))`` before a LeNet's first conv;
    ``F.pad(x, (k - 1, 0))`` before a causal ``Conv1d``): read into the convolution that follows it
    (:func:`~fedleak.nets.network.assemble`). Another value or mode (reflection, replication, circular: the border
    then repeats pixels of the image), or padded channels: refused, saying so."""
    m = op.module
    sides = tuple(m.padding) if m is not None else op.arg(0, "pad")
    value = getattr(m, "value", None) if m is not None else op.arg(2, "value")
    mode = PAD_MODES[type(m)] if m is not None else op.arg(1, "mode", "constant")
    maps = len(op.in_shape) - 1  # (C, H, W) maps or (C, L) signals
    if mode != "constant":
        raise op.refuse(f"{mode} padding fills the border with copies of the maps' own values, which no convolution's "
                        f"zero padding computes: only zero padding is read; {EXACT_SCOPE}")
    if value not in (None, 0) or maps not in (1, 2):
        raise op.refuse(f"only zero padding of (C, H, W) maps or (C, L) signals is read (here the value {value}, on "
                        f"{op.in_shape} inputs); {EXACT_SCOPE}")
    if not isinstance(sides, (tuple, list)) or len(sides) > 2 * maps or len(sides) % 2 \
            or any(not isinstance(p, int) or p < 0 for p in sides):
        raise op.refuse(f"pads {sides}: only padding of the maps' own dimensions, by whole numbers of 0 or more, is "
                        f"read; {EXACT_SCOPE}")
    pairs = [tuple(sides[k:k + 2]) for k in range(0, len(sides), 2)] + [(0, 0)] * (2 - len(sides) // 2)
    (left, right), (top, bottom) = pairs  # (F.pad lists the last dimension first)
    before, after = ((0, left), (0, right)) if maps == 1 else ((top, left), (bottom, right))
    return None if before == after == (0, 0) else Pad(op.node, before, after)


@converts(torch.permute, torch.transpose, torch.swapaxes, torch.movedim,
          *(("method", m) for m in ("permute", "transpose", "swapaxes", "movedim")))
def layout_change(op: Op) -> Layer:
    """A change of the order of each sample's values (time series stored N x T x C, read N x C x T): refused here,
    saying how to do without it (on the model's input, before its first layer, the exact methods read it as a map
    of the input: :mod:`fedleak.nets.input_peel`; just before an ``nn.Linear`` layer, maps flattened channels-last,
    they read it folded into that layer: :mod:`fedleak.nets.layout_fold`)."""
    raise op.refuse("a change of layout (permute, transpose) is read only on the model's input, before its first "
                    "layer (not by a malicious server's first layer), and on the output of a layer that an nn.Linear "
                    "module reads next through flattens, reshapes and Dropout alone (maps flattened channels-last): "
                    "elsewhere, store the data as the layer after it reads it (e.g. N x C x T) and pass the model "
                    f"without it; {EXACT_SCOPE}")


@converts(nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, F.dropout, F.dropout2d)
def dropout(op: Op) -> Dropout | None:
    """Eval-mode dropout is the identity; the network notes it when its rate is not 0
    (:func:`~fedleak.nets.network.training_mode_note`)."""
    p = float(op.module.p if op.module is not None else op.arg(0, "p", 0.5))
    training = op.module.training if op.module is not None else op.arg(1, "training", True)
    if training and p > 0:
        raise op.refuse("dropout in training mode drops random units of every sample; fedleak models the network "
                        "in eval mode, where dropout is the identity (call model.eval())")
    return Dropout(op.node, p) if p > 0 else None


@converts(nn.Identity, torch.clone, ("method", "contiguous"), ("method", "clone"))
def identity(op: Op) -> None:
    return None


CASTS = ("float", "double", "half", "bfloat16", "to", "type", "type_as")


@converts(*(("method", m) for m in CASTS))
def cast(op: Op) -> None:
    """``x.float()``, ``x.to(torch.float32)``, ``x.to(device)``, ``x.type(torch.float32)``: the identity where the
    values keep the model's dtype (the probe runs in it; a client's uint8 pixels reach the model as the same
    numbers); a cast to another dtype rounds every value, which the exact methods do not model: refused."""
    if op.in_dtype != op.out_dtype:
        raise op.refuse(f"casts the values from {op.in_dtype} to {op.out_dtype}, rounding each one, which fedleak's "
                        "exact methods do not model (they read the model in one dtype: that of its parameters); "
                        f"{EXACT_SCOPE}")
    return None


@converts(nn.LogSoftmax, F.log_softmax, torch.log_softmax, ("method", "log_softmax"))
def log_softmax(op: Op) -> Layer | None:
    """``log_softmax`` of the logits, as the last op, leaves the cross-entropy gradient unchanged (with
    ``NLLLoss``); anywhere else it is not a ReLU network."""
    dim = op.module.dim if op.module is not None else op.arg(0, "dim")
    # without a dim (older code: F.log_softmax(x)), torch takes dimension 1 of a batch of logits
    if not op.last or len(op.in_shape) != 1:
        raise op.refuse("log_softmax is supported only on the logits, as the model's last op")
    if dim not in (1, -1, None):
        raise op.refuse(f"log_softmax over dimension {dim} of the logits mixes the samples of a batch; take it over "
                        "the classes (dim=1)")
    return None


@converts(nn.Softmax, F.softmax, torch.softmax, ("method", "softmax"))
def softmax(op: Op) -> Layer | None:
    """A final ``softmax`` gives probabilities, and the gradient depends on the loss the client puts on them,
    which the model does not say: refused, saying what to pass instead."""
    if op.last:
        raise op.refuse("the model's forward ends with softmax, and the loss a client applies to probabilities is "
                        "not known. If it is NLLLoss of their log (the cross-entropy of the logits), pass the model "
                        "without its final softmax, or end it with log_softmax (or torch.log of the softmax); if it "
                        "is CrossEntropyLoss of the probabilities (a softmax applied twice, which also slows "
                        f"training), the exact methods do not read that loss; {EXACT_SCOPE}")
    raise unsupported(op)
