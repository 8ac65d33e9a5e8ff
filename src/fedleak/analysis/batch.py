"""The batch the exact methods read: the user's network, the inputs in its shape, and the labels.

Exclusivity analysis, fishing and exclusivity reduction all start here, so one kind of bad batch gets one
message. The network is read with :func:`fedleak.nets.as_network` from the batch itself (``inputs=``), so
a model written as an ``nn.Module`` class needs no ``input_shape``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedleak.binary import as_two_class
from fedleak.errors import FedleakError
from fedleak.nets import Network, as_network, forward_trace
from fedleak.validation import check_batch, check_labels


@dataclass(frozen=True)
class Batch:
    """``x``: the inputs (M x input_shape) in the model's dtype on its device; ``labels``: int64 on the CPU."""

    net: Network
    x: torch.Tensor
    labels: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.x.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype


def logits(net: Network, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The network's logits for inputs ``x`` (M x input_shape), computed in ``dtype`` on its device."""
    dtype = dtype or net.dtype
    with torch.no_grad():
        return forward_trace(net.head, net.features(x, dtype), dtype=dtype).logits


def predictions(net: Network, x: torch.Tensor) -> torch.Tensor:
    """The predicted classes (int64, CPU) for inputs ``x``, in the model's dtype."""
    return logits(net, x).argmax(1).cpu()


def read_batch(model: nn.Module | Network, inputs: object, labels: object = None) -> Batch:
    """Check ``inputs`` and ``labels`` against ``model`` (read with ``as_network(model, inputs=inputs)``).

    ``labels`` default to the model's predictions. A model with one logit is read as its two-class twin
    (:mod:`fedleak.binary`). Raises :class:`~fedleak.errors.FedleakError` (a
    :class:`~fedleak.errors.ModelError` when the model does not fit) naming the problem.
    """
    inputs = check_batch(inputs)
    # a model with one logit is read as its two-class twin (fedleak.binary), whose cross-entropy is its BCE
    net = model if isinstance(model, Network) else as_network(as_two_class(model)[0], inputs=inputs)
    if inputs[0].numel() != net.input_dim:
        raise FedleakError(f"each input has {inputs[0].numel()} values but the model takes {net.input_shape}")
    x = inputs.detach().reshape(inputs.shape[0], *net.input_shape).to(device=net.device, dtype=net.dtype)
    if labels is None:
        labels = predictions(net, x)
    labels = torch.as_tensor(labels).reshape(-1) if not isinstance(labels, torch.Tensor) else labels.reshape(-1)
    if labels.shape[0] != x.shape[0]:
        raise FedleakError(f"{x.shape[0]} inputs but {labels.shape[0]} labels")
    arr = check_labels(labels, net.num_classes)
    return Batch(net, x, torch.from_numpy(arr))
