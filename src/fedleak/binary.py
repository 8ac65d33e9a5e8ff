"""Binary classifiers with one logit, trained with binary cross-entropy on the logit (``BCEWithLogitsLoss``).

Such a model is its two-class softmax twin with the logits ``(0, z)``: ``softmax(0, z) = (1 - sigmoid(z),
sigmoid(z))``, so the twin's cross-entropy is the binary cross-entropy of ``z``, sample by sample, and its
gradient is the single-logit model's, with the output layer's rows ``(-g, g)`` for the observed row ``g`` (the
first row's gradient is minus the second's, as every softmax loss vector sums to 0). The attacks run on the twin
and its update, which hold exactly what the client's update holds; a certificate of the twin is one of the
client's batch. Labels are the twin's classes: 1 where the binary label is 1.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from fedleak.errors import FedleakError, ModelError
from fedleak.model_copy import copy_model
from fedleak.nets.output_layer import output_layer_names
from fedleak.sigmoid_output import logit_model
from fedleak.updates import GradientUpdate, WeightUpdate, as_gradient_update
from fedleak.validation import output_features

NOTE = ("a model with one logit is read as trained with binary cross-entropy on it (BCEWithLogitsLoss), as its "
        "two-class softmax twin (logits 0 and z), whose cross-entropy gradient is the same")
SIGMOID_NOTE = ("its forward ends with a sigmoid, read as trained with BCELoss on the probability it gives: the "
                "gradient at the logit z is sigmoid(z) - y, as with BCEWithLogitsLoss on z")


@dataclass(frozen=True)
class BinaryTwin:
    """The two-class twin of a single-logit model: ``model`` (a copy whose output layer ``layer`` gives the logits
    ``(0, z)``: an ``nn.Linear`` module's name, or the weight's that ``F.linear`` reads) and the names of that layer's
    ``weight`` and ``bias`` (None without one)."""

    model: nn.Module
    layer: str
    weight: str
    bias: str | None

    def gradient(self, update: GradientUpdate) -> GradientUpdate:
        """The twin's gradient: the output layer's entries ``g`` become ``(-g, g)``."""
        grads = dict(update.gradients)
        for name in self.output_names():
            if name in grads:
                g = grads[name]
                grads[name] = torch.cat([-g, g], 0)
        return GradientUpdate(grads, num_examples=update.num_examples, error=update.error)

    def weights(self, update: WeightUpdate) -> WeightUpdate:
        """The twin's weight update: the output layer's row ``w`` becomes ``(0, w)`` before, and ``(before -
        after, after)`` after, which is the twin's step (its first row's gradient is minus the second's)."""
        before, after = dict(update.before), dict(update.after)
        for name in self.output_names():
            if name in before:
                b, a = before[name], after[name]
                before[name], after[name] = torch.cat([torch.zeros_like(b), b], 0), torch.cat([b - a, a], 0)
        return replace(update, before=before, after=after)

    def output_names(self) -> list[str]:
        return [self.weight] + ([self.bias] if self.bias else [])


def as_two_class(model: nn.Module, update: object = None) -> tuple[nn.Module, object, tuple[str, ...]]:
    """``(model, update, ())`` as they are, or, for a single-logit ``model``, its twin's model and ``update`` (a
    :class:`~fedleak.WeightUpdate`, a :class:`~fedleak.GradientUpdate` or a mapping of gradients; None stays None)
    with the note saying so."""
    if not single_logit(model):
        return model, update, ()
    logit = logit_model(model)  # a forward ending with a sigmoid (BCELoss) or a squeeze: the logit as N x 1
    twin = binary_twin(model if logit is None else logit.module)
    if isinstance(update, WeightUpdate):
        update = twin.weights(update)
    elif update is not None:
        update = twin.gradient(as_gradient_update(update))
    return twin.model, update, (NOTE, SIGMOID_NOTE) if logit is not None and logit.sigmoid else (NOTE,)


def single_logit(model: nn.Module) -> bool:
    """Whether ``model``'s last Linear layer gives one output (a binary classifier's logit)."""
    return output_features(model) == 1


def binary_twin(model: nn.Module) -> BinaryTwin:
    """The two-class softmax twin of a single-logit ``model`` (a copy; ``model`` is not changed): its output layer
    (:func:`~fedleak.nets.output_layer.output_layer_names`: an ``nn.Linear`` module, replaced by one of two outputs,
    or the parameters ``F.linear`` reads, replaced by ones of two rows) gives ``(0, z)``."""
    try:
        weight, bias = output_layer_names(model)
    except FedleakError:
        weight = bias = None
    if weight is None or model.get_parameter(weight).shape[0] != 1:
        raise ModelError("the model has no last Linear layer with one output to read as a binary logit")
    twin = copy_model(model)
    layer, _, _ = weight.rpartition(".")
    if isinstance(old := twin.get_submodule(layer), nn.Linear):
        new = nn.Linear(old.in_features, 2, bias=old.bias is not None, device=old.weight.device,
                        dtype=old.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(torch.cat([torch.zeros_like(old.weight), old.weight], 0))
            if old.bias is not None:
                new.bias.copy_(torch.cat([torch.zeros_like(old.bias), old.bias], 0))
        new.weight.requires_grad_(old.weight.requires_grad)
        if old.bias is not None:
            new.bias.requires_grad_(old.bias.requires_grad)
        parent, _, child = layer.rpartition(".")
        setattr(twin.get_submodule(parent) if parent else twin, child, new)
        return BinaryTwin(twin, layer, weight, bias)
    for name in (weight, bias):  # F.linear of parameters: each becomes the two rows (0, its own)
        if name is not None:
            owner, _, attr = name.rpartition(".")
            p = twin.get_parameter(name)
            setattr(twin.get_submodule(owner), attr,
                    nn.Parameter(torch.cat([torch.zeros_like(p), p.detach()], 0), requires_grad=p.requires_grad))
    return BinaryTwin(twin, weight, weight, bias)
