"""Gradients clipped by norm per layer, read off their values.

A client that clips each layer's gradient to L2 norm ``c`` (``clip_grad_norm_(layer.parameters(), c)`` for each
layer, the per-layer clipping of McMahan et al. 2018) sends layers whose norms are all ``c``, to the float32 rounding
of the norms it computed, wherever the layer's gradient was larger. Two layers of an unclipped gradient have norms
that agree that closely once in thousands of updates. So an update with two or more layers at one norm (within
:data:`NORM_TOL`) reads as clipped per layer at that norm (:func:`read_layer_clip`); the exclusivity attack then
undoes the layers' unknown factors as it does for a declared ``clipping(per="layer")``
(:func:`fedleak.attacks.defense_aware.layer_scales`), which measures them from the update itself, so a chance
agreement only makes it measure factors of 1.

Clipping of the whole update by norm (``clip_grad_norm_(model.parameters(), c)``) leaves one norm, which tells
nothing; the exclusivity attack reads it as one unknown common factor where the batch size is reported.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

#: how closely clipped layers' norms agree: the client's float32 norm of a layer of millions of entries is off by up
#: to about 1e-4 (torch's float32 ``vector_norm``), and so is the one read here
NORM_TOL = 5e-4


@dataclass(frozen=True)
class LayerClip:
    """An update clipped per layer: ``bound`` (the norm ``c``) and the ``layers`` (parameter-name prefixes) at it."""

    bound: float
    layers: tuple[str, ...]

    def describe(self) -> str:
        names = ", ".join(f"'{n}'" for n in self.layers[:4]) + (" ..." if len(self.layers) > 4 else "")
        return (f"the update reads as clipped per layer at norm {self.bound:.6g}: its layers {names} have that L2 "
                f"norm to within {NORM_TOL:g}")


def read_layer_clip(tensors: Mapping[str, torch.Tensor]) -> LayerClip | None:
    """The per-layer clipping ``tensors`` (name -> gradient) show, or None: the largest set of two or more layers (a
    layer: the parameters sharing the name before the last ``.``) whose L2 norms agree within :data:`NORM_TOL`, with
    no layer above them; its ``bound`` is the smallest of their norms."""
    squares: dict[str, float] = {}
    for name, t in tensors.items():
        if t.is_floating_point() and t.numel():
            layer = name.rpartition(".")[0]
            squares[layer] = squares.get(layer, 0.0) + float(torch.linalg.vector_norm(t.detach())) ** 2
    norms = {layer: s**0.5 for layer, s in squares.items() if s > 0}
    best: list[str] = []
    for ref in norms.values():
        at = [layer for layer, n in norms.items() if abs(n / ref - 1) <= NORM_TOL]
        if len(at) > len(best):
            best = at
    if len(best) < 2:
        return None
    bound = min(norms[layer] for layer in best)
    if max(norms.values()) > bound * (1 + 2 * NORM_TOL):  # a layer above the bound: not clipped per layer
        return None
    return LayerClip(bound, tuple(best))
