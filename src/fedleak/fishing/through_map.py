"""Perturbing a batch of a model that maps its input inside ``forward`` (``(x - mean) / std`` with one number, per
channel or per value; ``x / 255``; ``2 x - 1``): fishing and exclusivity reduction work on the model's own inputs.

The map ``z = a x + b`` (:func:`fedleak.nets.input_map.peel_input_map`) is folded into the arrays the LPs read
(:class:`~fedleak.fishing.sample_net.HeadArrays`, :class:`~fedleak.fishing.sample_net.ConvStack`), so every LP is
written over ``x``: the data range is the box it is in every coordinate, whatever ``a`` and ``b`` are per channel,
and perturbation sizes and PSNR are in the inputs' own units. The exclusivity analyses before and after read what
the first layer reads: the model's own arithmetic, run on the inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedleak.fishing.sample_net import ConvStack, HeadArrays
from fedleak.nets import Network
from fedleak.nets.exact_view import first_layer_view
from fedleak.nets.input_map import InputMap
from fedleak.validation import check_batch


@dataclass(frozen=True)
class FirstLayerBatch:
    """``model`` without its input arithmetic, the batch's ``inputs`` as given, the same batch as the first layer
    reads it (``first``) and the ``input_map`` between the two (None where the model does no arithmetic on its
    input: then ``first`` is ``inputs``)."""

    model: nn.Module
    inputs: torch.Tensor
    first: torch.Tensor
    input_map: InputMap | None = None

    def first_layer(self, x: torch.Tensor) -> torch.Tensor:
        """What the first layer reads for a batch ``x`` of the model's inputs (the model's own arithmetic)."""
        return x if self.input_map is None else self.input_map.to_first_layer(x.to(self.inputs.device))

    def arrays(self, net: Network) -> tuple[ConvStack, HeadArrays]:
        """The conv stack and head (of ``net``, read from :attr:`model`) as the LPs read them, over the inputs."""
        return ConvStack(net, self.input_map), HeadArrays(net.head, None if net.blocks else self.input_map)


def first_layer_batch(model: nn.Module, inputs: torch.Tensor) -> FirstLayerBatch:
    """The batch fishing or exclusivity reduction perturbs, with the model's first layer's view of it."""
    inputs = check_batch(inputs)
    stripped, first, input_map = first_layer_view(model, inputs)  # (the model, BatchNorm1d on Linear folded in)
    return FirstLayerBatch(stripped, inputs, first, input_map)
