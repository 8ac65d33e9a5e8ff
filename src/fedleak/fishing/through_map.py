"""Perturbing a batch of a model that maps its input inside ``forward`` (``(x - mean) / std`` with one number, per
channel or per value; ``x / 255``; ``2 x - 1``): fishing and exclusivity reduction work on the model's own inputs.

The map ``z = a x + b`` (:func:`fedleak.nets.input_peel.peel_input_map`) is folded into the arrays the LPs read
(:class:`~fedleak.fishing.head_arrays.HeadArrays`, :class:`~fedleak.fishing.sample_net.ConvStack`), so every LP is
written over ``x``: the data range is the box it is in every coordinate, whatever ``a`` and ``b`` are per channel,
and perturbation sizes and PSNR are in the inputs' own units. The exclusivity analyses before and after read what
the first layer reads: the model's own arithmetic, run on the inputs. A change of layout there (``x.permute(0, 2,
1)``) moves each first-layer column to the input value it reads: the LPs are written over the data as stored.

Data normalised before the model (:class:`~fedleak.data.Normalization`, per channel) is perturbed the same way: its
pixels are handed to the model behind a module that normalises them (:func:`in_pixels`), and the perturbed pixels
are normalised back (:func:`normalised_back`), so every channel keeps to the pixels' range.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from fedleak.data.normalize import Normalization
from fedleak.fishing.head_arrays import HeadArrays
from fedleak.fishing.sample_net import ConvStack
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


R = TypeVar("R")


class NormalisingInput(nn.Module):
    """``(x - mean[c]) / std[c]`` per channel of N x C x H x W pixels, ``normalization``'s, as buffers (``like``'s dtype
    and device)."""

    def __init__(self, normalization: Normalization, like: torch.Tensor) -> None:
        super().__init__()
        for name, values in (("mean", normalization.mean), ("std", normalization.std)):
            self.register_buffer(name, torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def in_pixels(model: nn.Module, inputs: torch.Tensor, normalization: Normalization,
              run: Callable[[nn.Module, torch.Tensor], R]) -> tuple[R, torch.Tensor]:
    """``run`` on the pixels of ``inputs`` (data normalised by ``normalization``) and ``model`` behind a module that
    normalises them (the same modules: nothing of ``model`` changes, its modes included), and those pixels."""
    pixels = normalization.invert(check_batch(inputs))
    reading = nn.Sequential(NormalisingInput(normalization, pixels), model)
    reading.training = model.training  # (its own flag only: the user's modules keep theirs)
    return run(reading, pixels), pixels


def normalised_back(perturbed: torch.Tensor, pixels: torch.Tensor, inputs: torch.Tensor,
                    normalization: Normalization) -> torch.Tensor:
    """The ``perturbed`` pixels normalised as the client's data is, each sample whose pixels did not move its
    ``inputs`` row as it was (``pixels``: those inputs' pixels); on the CPU."""
    perturbed, pixels, inputs = (t.detach().cpu() for t in (perturbed, pixels, inputs))
    moved = (perturbed != pixels.to(perturbed.dtype)).flatten(1).any(dim=1).reshape(-1, *([1] * (inputs.dim() - 1)))
    return torch.where(moved, normalization.apply(perturbed).to(inputs.dtype), inputs)
