"""The smallest change of the model that lets the exact route apply at a batch size, checked by the plan's counting.

Conv blocks: a pooled block is at best unproven, so every pooled block loses its pooling, and each block gets the
fewest channels whose equations reach its unknowns, from the input up, counted on the inputs by running the changed
blocks (:mod:`fedleak.plan.convgrow`). Dense layers: each gets the fewest neurons
(:meth:`~fedleak.plan.exans.HeadModel.smallest_width`) whose ExANs the samples need. Every changed condition must
hold on ``1 - (1 - target) / k`` of the samples (``k`` conditions changed), so that together they hold on at least
``target`` of them (a union bound on the same drawn samples); the whole condition is then counted again on the
changed model over every input (:attr:`Proposal.checked`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fedleak.nets import Network
from fedleak.plan.conv import BlockShape
from fedleak.plan.convgrow import MAX_CHANNELS, choose_inputs, equations, grow_block, own_block
from fedleak.plan.exans import MAX_WIDTH, HeadModel
from fedleak.plan.result import Change, Proposal, layer_label

ASSUMPTION = "added neurons are drawn like each layer's own weights"
CONV_ASSUMPTION = ("added channels are drawn like each layer's own weights, and the dense head's activity stays as "
                   "measured; for conv blocks enough equations are necessary, not sufficient: check the changed model "
                   "with fedleak.plan (it tries the attack's proof)")


@dataclass(frozen=True)
class HeadShape:
    """The dense layers' arithmetic: ``in_features`` of the first, every width (hidden, then the classes) and
    which layers have a bias."""

    in_features: int
    widths: tuple[int, ...]
    biases: tuple[bool, ...]

    def parameters(self, in_features: int | None = None, hidden: tuple[int, ...] | None = None) -> int:
        sizes = [self.in_features if in_features is None else in_features,
                 *(self.widths[:-1] if hidden is None else hidden), self.widths[-1]]
        return sum(a * b + (b if bias else 0) for a, b, bias in zip(sizes, sizes[1:], self.biases))


def _grow_convs(net: Network, x: torch.Tensor, shapes: list[BlockShape], target: float, seed: int
                ) -> tuple[list, list[str]]:
    """Every block without its pooling and with the fewest channels that reach its count, from the input up."""
    chosen, blocked = [], []
    xs = choose_inputs(x)
    in_shape = tuple(net.input_shape)
    for i, (blk, shape) in enumerate(zip(net.blocks, shapes)):
        base = shape.changed(in_shape=in_shape, unpooled=True)
        grown = grow_block(blk, i, base, xs, chosen, target, seed)
        if grown is None:
            blocked.append(f"{layer_label(shape.name)} would need more than {MAX_CHANNELS:,} channels")
            grown = own_block(blk, base, i, seed)
        chosen.append(grown)
        in_shape = grown.shape.out_shape
    return chosen, blocked


def peeled_widths(head: HeadModel, batch_size: int, target: float, widths: list[int | None]) -> list[int | None]:
    """The widths each layer needs where the attack peels the update: from the widths the update as sent needs
    (``widths``; None: more than :data:`MAX_WIDTH`, tried at it), each layer in turn shrunk, by bisection, to the
    fewest neurons at which at least ``target`` of the samples meet the whole condition with peeling (a neuron only
    adds ExANs, in every round, so that fraction grows with the width); ``widths`` as they are where even the widest
    fall short."""
    top = [MAX_WIDTH if w is None else w for w in widths]
    if head.fraction(batch_size, top) < target:
        return widths
    for h, own in enumerate(head.widths):
        lo, hi = own - 1, top[h]  # lo fails (or is below the layer's own width), hi holds
        if head.fraction(batch_size, top[:h] + [own] + top[h + 1:]) >= target:
            hi = own
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if head.fraction(batch_size, top[:h] + [mid] + top[h + 1:]) >= target else (mid, hi)
        top[h] = hi
    return top


def propose(*, net: Network, x: torch.Tensor, shapes: list[BlockShape], conv_ok: np.ndarray, head: HeadModel,
            parameters: int, batch_size: int, target: float, seed: int = 0) -> Proposal:
    """The smallest change found (see the module docstring) for ``batch_size``, and its check. ``x``: the inputs
    the head was measured on (n x input shape); ``conv_ok``: per input, whether the blocks as they are reach
    their counts."""
    convs_change = bool(shapes) and (any(s.pool is not None for s in shapes) or float(conv_ok.mean()) < target)
    sources = len(head.layers) + (len(shapes) if convs_change else 0)
    slack = 1.0 - target - (0.0 if convs_change or not shapes else 1.0 - float(conv_ok.mean()))
    each = 1.0 - max(slack, 0.0) / max(sources, 1)
    changes: list[Change] = []
    blocked: list[str] = []
    new_shapes, ok = list(shapes), conv_ok
    if convs_change:
        grown, blocked = _grow_convs(net, x, shapes, each, seed)
        new_shapes = [g.shape for g in grown]
        counts = equations(x.to(torch.float32), grown)
        ok = np.all([c >= s.needed for c, s in zip(counts, new_shapes)], axis=0)
        for old, new in zip(shapes, new_shapes):
            if old.pool is not None:
                changes.append(Change(old.name, "pooling", old.pool[0], 1))
            if new.channels != old.channels:
                changes.append(Change(old.name, "channels", old.channels, new.channels))
    widths = list(head.widths)
    smallest = [head.smallest_width(h, batch_size, each) for h in range(len(head.layers))]
    if head.peel:
        smallest = peeled_widths(head, batch_size, target, smallest)
    for h, layer in enumerate(head.layers):
        width = smallest[h]
        if width is None:
            blocked.append(f"{layer_label(layer.name)} would need more than {MAX_WIDTH:,} neurons for batches of "
                           f"{batch_size}")
        elif width != layer.width:
            widths[h] = width
            changes.append(Change(layer.name, "width", layer.width, width))
    conv = torch.from_numpy(np.asarray(ok, dtype=bool)) if shapes else None
    fraction = head.fraction(batch_size, widths, conv)
    checked = fraction >= target and not blocked
    best = batch_size if checked else head.largest_batch(target, widths, conv)[0]
    dense = HeadShape(net.head.input_dim, tuple(d.out_features for d in net.head.dense),
                      tuple(d.bias_name is not None for d in net.head.dense))
    features = math.prod(new_shapes[-1].out_shape) if new_shapes else dense.in_features
    after = (parameters + sum(n.parameters - o.parameters for n, o in zip(new_shapes, shapes))
             + dense.parameters(features, tuple(widths)) - dense.parameters())
    return Proposal(batch_size, tuple(changes), fraction, checked, best, parameters, after,
                    CONV_ASSUMPTION if convs_change else ASSUMPTION, tuple(blocked))
