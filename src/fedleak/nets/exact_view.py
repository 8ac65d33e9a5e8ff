"""A model as fedleak's exact methods read it: its eval-mode ``BatchNorm1d`` layers folded (on a ``Linear`` layer's
features, :mod:`fedleak.nets.dense_norms`; on its input, read as a map, :mod:`fedleak.nets.input_norm`), the
arithmetic its forward does to its input peeled off (:mod:`fedleak.nets.input_map`), and the result read as a
:class:`~fedleak.nets.Network`. The exact attack, the planner, the analysis and fishing all start here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fedleak.nets.dense_norms import FoldedModel, fold_dense_norms
from fedleak.nets.frontend import as_network, asked_shape
from fedleak.nets.input_map import InputMap, first_layer_shape
from fedleak.nets.input_peel import peel_input_map
from fedleak.nets.network import Network, check_head_trainable


@dataclass(frozen=True, eq=False)
class ExactView:
    """``model``: the user's with each eval-mode ``BatchNorm1d`` on a ``Linear`` layer's features or on its input
    taken out (``fold``, None without any) and the arithmetic its forward does to its input peeled off;
    ``input_map``: that arithmetic, or the input's norm, as a map (None without either); ``net``: ``model`` read."""

    model: nn.Module
    input_map: InputMap | None
    net: Network
    fold: FoldedModel | None


def exact_view(model: nn.Module, *, input_shape: Sequence[int] | None = None,
               inputs: torch.Tensor | None = None) -> ExactView:
    """``model`` as the exact methods read it (:class:`ExactView`)."""
    fold, stripped, input_map = _taken_out(model, input_shape, inputs)
    if input_map is not None and input_map.first_shape is not None:  # a change of layout: the first layer's shape
        input_shape = first_layer_shape(input_map, input_shape)
        inputs = None if inputs is None else input_map.to_first_layer(inputs)
    net = as_network(stripped, input_shape=input_shape, inputs=inputs)
    return ExactView(stripped, input_map, net if fold is None else fold.read_into(net), fold)


def _taken_out(model: nn.Module, input_shape: Sequence[int] | None, inputs: torch.Tensor | None
               ) -> tuple[FoldedModel | None, nn.Module, InputMap | None]:
    """The norms taken out of ``model``, what is left with its input arithmetic peeled off, and the input's map."""
    fold = fold_dense_norms(model, asked_shape(input_shape, inputs))
    stripped, input_map = peel_input_map(model if fold is None else fold.model, input_shape=input_shape,
                                         inputs=inputs)
    if fold is not None and fold.input_norm is not None:  # (the first layer reads it alone: no arithmetic is left)
        dtype = fold.input_norm.linear.weight.dtype
        input_map = fold.input_norm.input_map(float(torch.finfo(dtype).eps))
    return fold, stripped, input_map


def exact_network(model: nn.Module, *, input_shape: Sequence[int] | None = None,
                  inputs: torch.Tensor | None = None) -> Network:
    """The network the exact methods read in ``model`` (:func:`exact_view`)."""
    return exact_view(model, input_shape=input_shape, inputs=inputs).net


def updated_network(model: nn.Module, *, input_shape: Sequence[int] | None = None) -> Network:
    """The network the exact attack reads from ``model``'s updates (:func:`exact_network`): a model whose dense head
    has a frozen parameter, which sends no gradient, is refused (:func:`~fedleak.nets.network.check_head_trainable`)
    as the attack refuses it."""
    net = exact_network(model, input_shape=input_shape)
    check_head_trainable(model, net)
    return net


def first_layer_view(model: nn.Module, inputs: torch.Tensor) -> tuple[nn.Module, torch.Tensor, InputMap | None]:
    """``model`` as the exact methods read it (:func:`exact_view`, without reading it into a network), ``inputs`` (a
    batch) as its first layer reads them, and the map between the two (``inputs`` as they are and None where there
    is none)."""
    _, stripped, input_map = _taken_out(model, None, inputs)
    if input_map is None:
        return stripped, inputs, None
    return stripped, input_map.to_first_layer(inputs), input_map
