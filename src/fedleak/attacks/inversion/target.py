"""The observed update in a form every objective can use, and the batch size and labels to search for.

An observed update becomes a :class:`Target`: per-parameter tensors plus the weights at which the client
computed it (the model's own weights for a FedSGD gradient, ``update.before`` for a FedAvg weight update).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fedleak.attacks.labels import class_signal, infer_label_counts, infer_labels, reads_classes
from fedleak.errors import FedleakError, ModelError, UpdateError
from fedleak.logits_of import NotLogits
from fedleak.nets import input_shape_of
from fedleak.nets.token_inputs import TokenInputs
from fedleak.updates import GradientUpdate, WeightUpdate, as_gradient_update, check_matches_model
from fedleak.validation import output_features


@dataclass(frozen=True)
class Target:
    """An observed update turned into per-parameter tensors (ordered like ``names``).

    ``kind`` is ``"gradient"`` (the mean-loss gradient, scale known) or ``"weights"`` (``before - after``,
    scale unknown). ``params`` are the weights at which the client computed its update (the model's own
    weights for a gradient, ``update.before`` for a weight update).
    """

    kind: str
    names: list[str]
    tensors: list[torch.Tensor]
    params: list[torch.Tensor]
    buffers: dict[str, torch.Tensor]
    batch_size: int | None
    local_steps: int | None
    input_shape: tuple[int, ...]

    @property
    def mapping(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.tensors))


def model_input_shape(model: nn.Module, input_shape: tuple[int, ...] | None) -> tuple[int, ...]:
    """The shape of one input sample: ``input_shape`` when given, else the one the model records, else the one
    its layer shapes imply (:func:`fedleak.nets.input_shape_of`)."""
    shape = input_shape if input_shape is not None else getattr(model, "input_shape", None)
    if shape is not None:
        return tuple(int(s) for s in shape)
    try:
        return input_shape_of(model)[0]
    except (TokenInputs, NotLogits):  # no input shape changes them
        raise
    except ModelError as exc:
        raise ModelError(f"the model does not record its input shape, and fedleak could not derive it from the layer "
                         f"shapes: {exc}" + ("" if "input_shape=" in str(exc) else "; pass input_shape=")) from None


def prepare_target(
    model: nn.Module,
    update: GradientUpdate | WeightUpdate | Mapping[str, torch.Tensor],
    *,
    input_shape: tuple[int, ...] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Target:
    """Check ``update`` against ``model`` and return it as a :class:`Target` (raises ``UpdateError``)."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not named:
        raise ModelError("the model has no trainable parameters")
    names = list(named)
    shape = model_input_shape(model, input_shape)
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    if isinstance(update, WeightUpdate):
        state_names = set(model.state_dict())
        extra = sorted(set(update.before) - state_names)
        if extra:
            raise UpdateError(f"the weight update has entries the model does not have: {extra}")
        check_matches_model(model, {k: v for k, v in update.before.items() if k in named}, "weight update")
        for k in buffers:
            if k in update.before:
                if tuple(update.before[k].shape) != tuple(buffers[k].shape):
                    raise UpdateError(f"the weight update's buffer '{k}' has shape {tuple(update.before[k].shape)} "
                                      f"but the model's has {tuple(buffers[k].shape)}")
                buffers[k] = update.before[k].detach().clone()
        delta = update.delta()
        tensors = [delta[n].to(dtype) for n in names]
        if all(float(t.abs().max()) == 0 for t in tensors):
            raise UpdateError("the weight update is zero on every trainable parameter")
        params = [update.before[n].detach().to(dtype).clone() for n in names]
        return Target("weights", names, tensors, params, buffers, update.num_examples, update.local_steps, shape)
    grads = as_gradient_update(update)
    check_matches_model(model, grads.gradients, "gradient")
    tensors = [grads.gradients[n].to(dtype) for n in names]
    if all(float(t.abs().max()) == 0 for t in tensors):
        raise UpdateError("the gradient update is zero on every parameter")
    params = [named[n].detach().to(dtype).clone() for n in names]
    return Target("gradient", names, tensors, params, buffers, grads.num_examples, None, shape)


def batch_size_of(model: nn.Module, target: Target, requested: int | None, notes: list[str]) -> int:
    """The batch size to reconstruct: requested, else the update's ``num_examples``, else the number of classes
    the output layer shows (its negative entries: a class absent from the batch has a positive one), at least 1
    (noted: the batch holds at least that many samples)."""
    if requested is not None:
        if int(requested) < 1:
            raise FedleakError(f"batch_size must be at least 1, got {requested}")
        return int(requested)
    if target.batch_size is not None:
        return int(target.batch_size)
    shown = max(int((class_signal(model, target.mapping) < 0).sum()), 1)
    notes.append(f"the update does not reveal its batch size: assumed {shown}, the number of classes its output "
                 "layer shows (the batch holds at least one sample of each; pass batch_size=...)")
    return shown


def resolve_labels(
    model: nn.Module, target: Target, batch_size: int, labels: Any, notes: list[str],
    known: torch.Tensor | None = None, class_weights: tuple[float, ...] | None = None,
) -> tuple[torch.Tensor, np.ndarray]:
    """Labels to use for the whole batch (given, or inferred from the output layer, with the client's
    ``class_weights``) and their counts."""
    if labels is not None and not isinstance(labels, str):
        y = torch.as_tensor(labels).long().flatten()
        if y.numel() != batch_size:
            raise FedleakError(f"labels has {y.numel()} entries but the batch size is {batch_size}")
        notes.append("labels given by the caller")
        classes = (class_signal(model, target.mapping).numel() if reads_classes(model, target.mapping)
                   else output_features(model) or 1)  # one count per class (a frozen output layer: its width)
        return y, np.bincount(y.numpy(), minlength=max(int(y.max()) + 1, classes))
    signal = class_signal(model, target.mapping)
    y = infer_labels(model, target.mapping, batch_size, known, class_weights)
    counts = (infer_label_counts(signal, batch_size, known, class_weights) if batch_size > 1 or known is not None
              else np.bincount(y.numpy(), minlength=signal.numel()))
    rule = "iDLG's rule (the single negative output-bias entry)" if batch_size == 1 else \
        "output-layer sign/count rule"
    notes.append(f"labels inferred from the update by {rule}: {y.tolist()}")
    return y, counts
