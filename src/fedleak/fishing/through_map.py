"""Perturbing a batch of a model that normalises its input inside ``forward``: fishing and exclusivity reduction
work on what the first layer reads and hand back the model's inputs.

Where one number scales and one shifts every value (``(x - 0.1307) / 0.3081``, ``x / 255``, ``2 x - 1``: the map
:func:`fedleak.nets.input_map.peel_input_map` reads), the perturbation of the first layer's input ``z = a x + b``
is one of ``x`` scaled by ``1 / |a|``: the data range maps to an interval, a perturbation's size divides by ``|a|``
and its PSNR (peak: the range's width) is the same. A map that differs per channel or per value turns the data
range into a box of different sides, which the LPs' one interval does not state: refused, saying what to do.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol, TypeVar

import torch
from torch import nn

from fedleak.errors import ModelError
from fedleak.fishing.perturb import resolve_data_range
from fedleak.nets.exact_view import first_layer_view
from fedleak.nets.input_map import InputMap
from fedleak.validation import check_batch

# the first layer's values at the data range's ends are computed in float32 by the client: its range is widened by
# this many of their units in the last place, so that a client's own inputs never fall outside it
ENDS_ULPS = 4.0


class Perturbed(Protocol):
    """A fishing or reduction result: the perturbed batch and per-sample records with ``linf`` and ``l2``."""

    inputs: torch.Tensor
    samples: tuple
    options: object
    data_range: tuple[float, float]


P = TypeVar("P", bound=Perturbed)


@dataclass(frozen=True)
class FirstLayerBatch:
    """``inputs`` as ``model`` (without its input arithmetic) reads them, their ``data_range`` there (None: resolved
    on the inputs as given), and the ``input_map`` and the model inputs' ``pixel_range`` (both None where the model
    does no arithmetic on its input)."""

    model: nn.Module
    inputs: torch.Tensor
    data_range: tuple[float, float] | None
    input_map: InputMap | None = None
    pixel_range: tuple[float, float] | None = None

    def restore(self, result: P, options: object) -> P:
        """``result`` (of this batch) in the model's inputs: its perturbed batch mapped back and kept inside the
        data range, each sample's perturbation size over ``|a|``, and the ``options`` and data range asked for."""
        if self.input_map is None:
            return result
        lo, hi = self.pixel_range
        scale = abs(float(self.input_map.scale[0]))
        x = self.input_map.to_inputs(result.inputs).clamp(lo, hi)
        samples = tuple(replace(s, linf=s.linf / scale, l2=s.l2 / scale) for s in result.samples)
        return replace(result, inputs=x, samples=samples, options=options, data_range=(lo, hi))


def first_layer_batch(model: nn.Module, inputs: torch.Tensor, data_range: tuple[float, float] | None,
                      what: str) -> FirstLayerBatch:
    """The batch ``what`` (fishing, exclusivity reduction) perturbs: ``inputs`` as the model's first layer reads
    them, where the model normalises inside ``forward`` (see the module), else as they are."""
    inputs = check_batch(inputs)
    stripped, first, input_map = first_layer_view(model, inputs)
    if input_map is None:  # (``stripped``: the model, its BatchNorm1d on Linear features folded in)
        return FirstLayerBatch(stripped, inputs, data_range)
    if not input_map.uniform:
        raise ModelError(f"{what} reads a normalisation inside forward only where one number scales and one shifts "
                         f"every value; this model's differs per channel or per value ({input_map.describe()}): "
                         "normalise the data instead (fedleak.Dataset.normalized(mean, std)) and pass the model "
                         "without it")
    lo, hi = resolve_data_range(inputs, data_range, what)
    a, b = float(input_map.scale[0]), float(input_map.shift[0])
    z_lo, z_hi = sorted((a * lo + b, a * hi + b))
    slack = ENDS_ULPS * float(torch.finfo(first.dtype).eps) * max(abs(z_lo), abs(z_hi), 1.0)
    return FirstLayerBatch(stripped, first, (z_lo - slack, z_hi + slack), input_map, (lo, hi))
