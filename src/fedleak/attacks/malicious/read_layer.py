"""Reading a malicious first layer and the update there, as the trap-weight, imprint and class-fishing attacks do:
the model as a fully connected network, its first two Linear layers, the update as a gradient-like map with the
rounding error of each entry, and the update's first-layer rows (see :mod:`fedleak.attacks.malicious`)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from fedleak.errors import ModelError, UpdateError
from fedleak.nets import Network, ReluMLP, as_network
from fedleak.nets.layers import Dense
from fedleak.nets.network import check_head_trainable
from fedleak.updates import GradientUpdate, WeightUpdate, check_matches_model

F64 = torch.float64


def fully_connected(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> Network:
    """``model`` read by :func:`fedleak.nets.as_network`; its first layer must be a Linear layer on the inputs."""
    net = as_network(model, input_shape=input_shape)
    if net.blocks:
        raise ModelError(f"trap and imprint weights go into a first Linear layer on the inputs, and class fishing "
                         f"reads one; this model starts "
                         f"with conv layer '{net.blocks[0].name}'")
    check_head_trainable(model, net)
    return net


def first_two_dense(model: nn.Module) -> tuple[ReluMLP, Dense, Dense]:
    """The model's head and its first two Linear layers (the first with a bias, followed by a ReLU), whose weights
    (:attr:`~fedleak.nets.layers.Dense.weight`, ``bias``) are the model's own."""
    net = fully_connected(model).head
    if net.depth == 0:
        raise ModelError("a malicious first layer needs at least one hidden ReLU layer")
    first = net.dense[0]
    if first.bias is None:
        raise ModelError(f"layer '{first.name}' has no bias; trap and imprint weights need one")
    return net, first, net.dense[1]


def update_as_delta(model: nn.Module, update) -> tuple[dict[str, torch.Tensor], int | None, dict[str, torch.Tensor]]:
    """The update as a gradient-like map (a WeightUpdate gives ``before - after``), num_examples, and
    a bound on each entry's error (half an ulp of each operand, or of the gradient, plus the update's ``error``)."""
    if isinstance(update, WeightUpdate):
        grads, n, error = update.delta(), update.num_examples, update.error
        noise = {k: (half_ulp(update.before[k]) ** 2 + half_ulp(update.after[k]) ** 2).sqrt() for k in grads}
    elif isinstance(update, GradientUpdate):
        grads, n, error = dict(update.gradients), update.num_examples, update.error
        noise = {k: 8 * half_ulp(v) for k, v in grads.items()}  # the float sum over the batch
    elif isinstance(update, Mapping):
        grads, n, error = dict(GradientUpdate(update).gradients), None, 0.0
        noise = {k: 8 * half_ulp(v) for k, v in grads.items()}
    else:
        raise UpdateError(f"an update must be a GradientUpdate, a WeightUpdate or a dict; got {type(update).__name__}")
    check_matches_model(model, grads, "update")
    if error:  # a known transport error (e.g. secure aggregation's quantization) on every entry
        noise = {k: v + error for k, v in noise.items()}
    return grads, n, noise


def half_ulp(t: torch.Tensor) -> torch.Tensor:
    """Half a unit in the last place: the rounding error of storing ``t``."""
    return t.detach().abs().to(F64) * (0.5 * float(torch.finfo(t.dtype).eps))


def first_layer(model: nn.Module, update, what: str, input_shape: tuple[int, ...] | None = None):
    """The network, and the update's first-layer rows (weights ``G``, biases ``g``), ``num_examples``, their
    rounding noise per row and the next layer's weight gradient, in float64 on the network's device."""
    net = fully_connected(model, input_shape)
    head = net.head
    if head.depth == 0 or head.dense[0].bias_name is None:
        raise ModelError(f"the {what} attack needs a first hidden layer with a bias")
    grads, n_examples, noise = update_as_delta(model, update)
    d0, dev = head.dense[0], head.device
    G = grads[d0.weight_name].to(device=dev, dtype=F64).reshape(d0.out_features, -1)
    g = grads[d0.bias_name].to(device=dev, dtype=F64)
    nG = noise[d0.weight_name].to(dev).reshape(d0.out_features, -1).amax(1)
    ng = noise[d0.bias_name].to(dev)
    G_next = grads[head.dense[1].weight_name].to(device=dev, dtype=F64)
    return net, G, g, n_examples, (nG, ng), G_next


def ratio_bound(X: torch.Tensor, nG: torch.Tensor, ng: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """Estimated max abs error of ``X = num/den`` when num's entries err by ``nG`` and den by ``ng``."""
    return (nG ** 2 + (X.abs().amax(1) * ng) ** 2).sqrt() / den.abs().clamp_min(1e-300)
