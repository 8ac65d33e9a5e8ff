"""The rebuilt batch's whole gradient against the observed one (the CNN certificate's last step,
:func:`fedleak.attacks.exact.conv_step.whole_batch`; the terms peeling subtracts,
:func:`fedleak.attacks.exact.peeling.residual_update`), by real autograd in float64, without a float64 copy of a
dense layer, the first one included (its input is data, which autograd does not differentiate: the layer's
backward pass is anchored so that it runs).

A wide dense layer's weights and gradient in float64 would each take twice the layer's own size (a CNN's
25088 x 1024 head layer: 200 MB each, next to a 100 MB gradient). The recomputation holds neither: while the model
runs, every dense layer of the head goes through :class:`Linear64`, a float64 linear layer that reads the layer's
weights a piece at a time (:mod:`fedleak.nets.float64`); autograd hands it its output's gradient, and the layer's
weight gradient, that signal's product with the layer's input summed over the samples, is formed and compared
with the observed one a piece of rows at a time. Every other parameter (conv layers, biases) gets its float64
gradient from autograd as it is.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from fedleak.client_loss import client_loss
from fedleak.nets import Network
from fedleak.nets.cast import cast
from fedleak.nets.float64 import back64, linear64, piece_rows

F64 = torch.float64
PIECE = 1 << 20  # entries of a parameter compared at once


class Linear64(torch.autograd.Function):
    """``x @ W.T`` in float64 for a weight ``W`` of any float dtype, read a piece of rows at a time; the backward
    pass appends ``(output gradient, input)``, both flattened to rows, to ``sink`` and gives ``W`` no gradient.
    ``anchor``: an empty tensor that requires grad, so that autograd runs the backward pass where nothing else the
    layer reads does (the first layer: its input is data); the pass into the input runs only where it needs it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, W: torch.Tensor, sink: list, anchor: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(flat)
        ctx.W, ctx.sink, ctx.shape = W, sink, x.shape
        return linear64(flat, W).reshape(*x.shape[:-1], W.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (flat,) = ctx.saved_tensors
        d = grad.reshape(-1, grad.shape[-1])
        ctx.sink.append((d.detach(), flat.detach()))
        into = back64(d, ctx.W).reshape(ctx.shape) if ctx.needs_input_grad[0] else None
        return into, None, None, None


CASTS = {torch.Tensor.float, torch.Tensor.to, torch.Tensor.type}  # the ways a forward casts its input to float32


class DenseThrough64(TorchFunctionMode):
    """While active, ``F.linear`` of a float64 input with one of ``sinks``' weights (by identity) runs through
    :class:`Linear64` into that weight's sink, and a float64 tensor's cast to float32 in the forward (``x.float()``,
    ``x.to(torch.float32)``: a model that casts its input) keeps it float64; every other call runs as it is."""

    def __init__(self, sinks: dict[int, tuple[torch.Tensor, list]], anchor: torch.Tensor):
        super().__init__()
        self.sinks, self.anchor = sinks, anchor

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in CASTS and args and isinstance(args[0], torch.Tensor) and args[0].dtype == F64 and (
                func is torch.Tensor.float or torch.float32 in (*args[1:], *kwargs.values())):
            return args[0]
        if func is F.linear and len(args) >= 2 and args[0].dtype == F64 and id(args[1]) in self.sinks:
            W, sink = self.sinks[id(args[1])]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            out = Linear64.apply(args[0], W, sink, self.anchor)
            return out if bias is None else out + bias
        return func(*args, **kwargs)


@dataclass(frozen=True, eq=False)
class SummedProducts:
    """A streamed weight's gradient ``sum_k d_k^T x_k`` over its ``(signal, input)`` pairs (float64), read by
    index without forming the whole: rows (an index or a slice of the first axis), columns (``(slice(None),
    cols)``) or every entry (``...``)."""

    pairs: tuple[tuple[torch.Tensor, torch.Tensor], ...]

    @property
    def shape(self) -> torch.Size:
        d, x = self.pairs[0]
        return torch.Size((d.shape[1], x.shape[1]))

    def __getitem__(self, index) -> torch.Tensor:
        if index is Ellipsis:
            terms = [d.T @ x for d, x in self.pairs]
        elif isinstance(index, tuple):
            rows, cols = index
            if rows != slice(None):
                raise IndexError(f"SummedProducts reads rows, columns or every entry, not {index!r}")
            terms = [d.T @ x[:, cols] for d, x in self.pairs]
        else:
            terms = [d[:, index].T @ x for d, x in self.pairs]
        for t in terms[1:]:
            terms[0] += t
        return terms[0]


@dataclass(frozen=True)
class BatchGradient:
    """The rebuilt batch's gradient (sum over samples of the cross-entropy, float64), read a piece at a time:
    ``grads`` holds autograd's gradient of every parameter but the streamed dense weights, whose ``(signal,
    input)`` pairs ``sinks`` holds instead."""

    grads: dict[str, torch.Tensor]
    sinks: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]

    def names(self) -> list[str]:
        return [*self.grads, *self.sinks]

    def pieces(self, name: str, observed: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(recomputed, observed)`` pieces of parameter ``name``, both float64 (``observed``: its observed
        gradient, of any float dtype, read a piece at a time)."""
        if name in self.grads:
            p, o = self.grads[name].reshape(-1), observed.reshape(-1)
            for i in range(0, len(o), PIECE):
                yield p[i : i + PIECE], o[i : i + PIECE].to(F64)
            return
        for rows, p in self.row_pieces(name, observed.shape):
            yield p.reshape(-1), observed[rows].to(F64).reshape(-1)

    def row_pieces(self, name: str, shape: torch.Size) -> Iterator[tuple[slice, torch.Tensor]]:
        """``(rows, recomputed)`` pieces of parameter ``name`` (of ``shape``), float64: a streamed dense weight's
        product formed a piece of rows at a time, any other parameter whole."""
        if name in self.grads:
            yield slice(None), self.grads[name]
            return
        products = self.products(name)
        step = piece_rows(*shape)
        for s in range(0, shape[0], step):
            yield slice(s, s + step), products[s : s + step]

    def plus(self, other: BatchGradient) -> BatchGradient:
        """The gradient of this batch and ``other`` together (every term summed; a streamed weight's pairs, both
        batches', laid end to end in one: one product reads them): a batch's gradient is the sum of its samples'
        terms."""
        if self.grads.keys() != other.grads.keys() or self.sinks.keys() != other.sinks.keys():
            raise ValueError("the two batch gradients hold different parameters or stream different weights")
        pairs = {k: [*v, *other.sinks[k]] for k, v in self.sinks.items()}
        joined = {k: [(torch.cat([d for d, _ in v]), torch.cat([x for _, x in v]))] for k, v in pairs.items()}
        return BatchGradient({k: v + other.grads[k] for k, v in self.grads.items()}, joined)

    def products(self, name: str) -> SummedProducts:
        """Streamed dense weight ``name``'s gradient, read by index (:class:`SummedProducts`)."""
        return SummedProducts(tuple(self.sinks[name]))


def batch_gradient(model: nn.Module, net: Network, X: torch.Tensor, y: torch.Tensor, smoothing: float = 0.0,
                   class_weights: tuple[float, ...] | None = None, focal_gamma: float = 0.0, *,
                   sample_weights: torch.Tensor | None = None, as_sent: bool = False, client_rows: int = 0
                   ) -> BatchGradient:
    """The gradient of the summed cross-entropy of ``(X, y)`` at ``model``'s parameters, in float64 by real
    autograd (:class:`BatchGradient`), with the loss's label ``smoothing`` and ``class_weights`` (or the summed focal
    loss of exponent ``focal_gamma``), each sample's loss times its ``sample_weights`` entry where given. With
    ``as_sent``, the logits' gradient (the loss vectors) is the client's own, computed in the model's dtype as the
    client does (``softmax - one-hot`` of a confident sample cancels: off by an epsilon of ``1 - p_y``), and only
    its backward pass runs in float64; its forward is taken on ``client_rows`` rows where that is more than the
    samples given (the inputs repeated), as a batch of the client's ran it: a float32 product of a few rows takes
    another path in the BLAS and rounds otherwise (:mod:`fedleak.attacks.exact.peeling`). The head's
    dense weights in another dtype are streamed (never copied) where the model reads them through ``F.linear``
    (``nn.Linear`` does), else copied like the others."""
    params = dict(model.named_parameters())
    streamed = {d.weight_name for d in net.head.dense if params[d.weight_name].dtype != F64}
    try:
        out = recompute(model, params, streamed, X, y, smoothing, class_weights, focal_gamma, sample_weights, as_sent,
                        client_rows)
    except RuntimeError:  # a weight read other than through F.linear meets a float64 input
        out = None
    if out is None or not all(out.sinks.values()):
        out = recompute(model, params, set(), X, y, smoothing, class_weights, focal_gamma, sample_weights, as_sent,
                        client_rows)
    return out


def recompute(model: nn.Module, params: dict[str, torch.Tensor], streamed: set[str], X: torch.Tensor,
              y: torch.Tensor, smoothing: float = 0.0, class_weights: tuple[float, ...] | None = None,
              focal_gamma: float = 0.0, sample_weights: torch.Tensor | None = None, as_sent: bool = False,
              client_rows: int = 0) -> BatchGradient:
    """:func:`batch_gradient` with the weights ``streamed`` through :class:`Linear64`."""
    weights = {k: params[k].detach() for k in streamed}
    sinks: dict[str, list] = {k: [] for k in streamed}
    leaves = {k: leaf(cast(v, F64)) for k, v in params.items() if k not in streamed}
    buffers = {k: v.to(F64) if v.is_floating_point() else v for k, v in model.named_buffers()}
    anchor = torch.empty(0, dtype=F64, device=X.device, requires_grad=True)  # every streamed layer runs its backward
    with DenseThrough64({id(weights[k]): (weights[k], sinks[k]) for k in streamed}, anchor):
        logits = torch.func.functional_call(model, {**leaves, **weights, **buffers}, (X.to(F64),))
    loss = functools.partial(client_loss, labels=y, reduction="none", label_smoothing=smoothing,
                             class_weights=class_weights, focal_gamma=focal_gamma)
    if as_sent:  # the client's loss vectors: its forward and loss in its dtype, differentiated there
        with torch.enable_grad():
            rows = X if client_rows <= len(X) else X[torch.arange(client_rows, device=X.device) % len(X)]
            own = torch.func.functional_call(model, {k: v.detach() for k, v in params.items()}, (rows,))
            own = own[: len(X)].detach().requires_grad_(True)
            signal = torch.autograd.grad(loss(own).sum(), own)[0].to(F64)
        weighted = signal if sample_weights is None else signal * sample_weights.to(signal)[:, None]
        grads = torch.autograd.grad(logits, [*leaves.values(), anchor], grad_outputs=weighted, allow_unused=True)
    else:
        each = loss(logits)
        total = each.sum() if sample_weights is None else (each * sample_weights.to(each)).sum()
        grads = torch.autograd.grad(total, [*leaves.values(), anchor], allow_unused=True)  # (and layers never read)
    return BatchGradient({k: torch.zeros_like(v) if g is None else g.detach()
                          for (k, v), g in zip(leaves.items(), grads)}, sinks)


def leaf(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a leaf autograd differentiates by: detached, and copied where it was made in inference mode (the
    float64 copy an MLP's attack cached there)."""
    return (t.clone() if t.is_inference() else t.detach()).requires_grad_(True)


def gradient_residual(pred: BatchGradient, grads: dict[str, torch.Tensor], factor: float | None = None
                      ) -> tuple[float, float]:
    """How far ``factor`` times the rebuilt batch's gradient ``pred`` is from the observed ``grads`` (every parameter
    they hold): the worst parameter's residual relative to its observed gradient, and the factor (where None, the
    least-squares fit over every parameter: an update's unknown common scale)."""

    def totals(k: str, *terms) -> list[float]:  # each term summed over k's pieces, in one pass
        out = [0.0] * len(terms)
        for p, o in pred.pieces(k, grads[k]):
            for j, term in enumerate(terms):
                out[j] += float(term(p, o).sum())
        return out

    if factor is None:
        fits = [totals(k, lambda p, o: p * o, lambda p, o: p * p) for k in grads]
        factor = sum(f[0] for f in fits) / max(sum(f[1] for f in fits), 1e-300)
    worst = max(float(np.sqrt(res)) / max(float(np.sqrt(obs)), 1e-300) for res, obs in (
        totals(k, lambda p, o: (factor * p - o) ** 2, lambda p, o: o * o) for k in grads))
    return worst, factor
