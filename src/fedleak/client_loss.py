"""The loss a client trains with: cross-entropy on class indices or soft labels, its options (label smoothing, class
weights, focal exponent), binary cross-entropy for a single output, and the classes those outputs predict."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from fedleak.errors import FedleakError
from fedleak.focal import check_focal_gamma, focal_loss
from fedleak.logits_of import per_sample_logits
from fedleak.validation import check_float

if TYPE_CHECKING:
    from fedleak.defenses.stack import DefenseStack


def is_soft(labels: torch.Tensor) -> bool:
    """Whether ``labels`` are soft labels: an ``M x K`` float tensor of class probabilities (MixUp, InstaHide)."""
    return isinstance(labels, torch.Tensor) and labels.is_floating_point() and labels.ndim == 2


def hard_labels(labels: torch.Tensor) -> torch.Tensor:
    """Class indices: ``labels`` themselves, or the most probable class of soft labels."""
    return labels.argmax(1) if is_soft(labels) else labels


def check_label_smoothing(value: object) -> float:
    """A cross-entropy's label smoothing (``F.cross_entropy(..., label_smoothing=s)``): a number in [0, 1)."""
    smoothing = check_float("label_smoothing", value, low=0.0)
    if smoothing >= 1:
        raise FedleakError(f"label_smoothing must be below 1 (the weight of the uniform target, F.cross_entropy's "
                           f"label_smoothing), got {smoothing}")
    return smoothing


def check_class_weights(value: object, *, label_smoothing: float | None = 0.0) -> tuple[float, ...] | None:
    """A cross-entropy's class weights (``F.cross_entropy(..., weight=w)``, one positive finite number per
    class), as a tuple of floats, or None. With a ``label_smoothing`` above 0 they are refused: the loss
    vectors of a weighted smoothed cross-entropy are not a sample's ``p - target`` times one factor."""
    if value is None:
        return None
    weights = None
    if not isinstance(value, (str, bytes)):
        try:
            weights = tuple(float(v) for v in (value.tolist() if hasattr(value, "tolist") else value))
        except (TypeError, ValueError):
            pass
    if weights is None or len(weights) < 2 or not all(math.isfinite(w) and w > 0 for w in weights):
        raise FedleakError(f"class_weights must be one positive finite number per class (at least 2), got "
                           f"{value!r}")
    if label_smoothing:
        raise FedleakError("class_weights with label_smoothing is not supported (the weighted smoothed "
                           "cross-entropy's loss vectors are not p - target times one factor per sample): pass one")
    return weights


@dataclass(frozen=True)
class ClientLoss:
    """The loss options a client trains with, checked together: a cross-entropy's ``label_smoothing`` and
    ``class_weights`` (``F.cross_entropy``'s ``label_smoothing`` and ``weight``), or a focal loss's exponent
    ``focal_gamma`` (:mod:`fedleak.focal`). The defaults are the plain mean cross-entropy."""

    label_smoothing: float = 0.0
    class_weights: tuple[float, ...] | None = None
    focal_gamma: float = 0.0

    def __post_init__(self) -> None:
        smoothing = check_label_smoothing(self.label_smoothing)
        weights = check_class_weights(self.class_weights, label_smoothing=smoothing)
        object.__setattr__(self, "label_smoothing", smoothing)
        object.__setattr__(self, "class_weights", weights)
        object.__setattr__(self, "focal_gamma", check_focal_gamma(self.focal_gamma, label_smoothing=smoothing,
                                                                  class_weights=weights))

    @property
    def plain(self) -> bool:
        """Whether this is the plain cross-entropy (no option set)."""
        return not self.options()

    def options(self) -> dict[str, object]:
        """The options set, as the keywords the gradient and the attacks that take a client's loss take."""
        return {k: v for k, v in (("label_smoothing", self.label_smoothing), ("class_weights", self.class_weights),
                                  ("focal_gamma", self.focal_gamma)) if v}

    def describe(self) -> str:
        """The loss in words, e.g. ``cross-entropy with label smoothing 0.1``."""
        if self.focal_gamma:
            return f"focal loss of exponent {self.focal_gamma:g}"
        said = [f"label smoothing {self.label_smoothing:g}"] if self.label_smoothing else []
        said += [f"class weights {list(self.class_weights)}"] if self.class_weights is not None else []
        return "cross-entropy" + (f" with {', '.join(said)}" if said else "")


PLAIN_LOSS = ClientLoss()  # the plain mean cross-entropy


def client_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean", *,
                probability: bool = False, label_smoothing: float = 0.0,
                class_weights: tuple[float, ...] | None = None, focal_gamma: float = 0.0) -> torch.Tensor:
    """The loss a client trains with: the cross-entropy of the logits, with class indices or soft labels,
    ``label_smoothing`` and ``class_weights`` as ``F.cross_entropy`` takes them (``label_smoothing`` and
    ``weight``), or, with ``focal_gamma`` above 0, the focal loss of class indices (:mod:`fedleak.focal`); for a
    single output, the binary cross-entropy of it (labels 0 or 1, or soft labels of two classes,
    whose class-1 probability is the target): of the logit (``BCEWithLogitsLoss``), or, for a model whose forward
    ends with a sigmoid (``probability``), of the probability it gives (``BCELoss``), which takes neither."""
    if logits.shape[1] == 1:
        if label_smoothing or class_weights is not None or focal_gamma:
            raise FedleakError("label_smoothing, class_weights and focal_gamma apply to a cross-entropy over K >= 2 "
                               "outputs; this model has one output (binary cross-entropy)")
        target = (labels[:, 1] if is_soft(labels) else labels).to(logits.dtype)
        if probability:
            return nn.functional.binary_cross_entropy(logits[:, 0], target, reduction=reduction)
        return nn.functional.binary_cross_entropy_with_logits(logits[:, 0], target, reduction=reduction)
    if focal_gamma:
        if is_soft(labels):
            raise FedleakError("focal_gamma takes class indices, not soft labels")
        return focal_loss(logits, labels, focal_gamma, reduction)
    target = labels.to(logits.dtype) if is_soft(labels) else labels.long()
    return nn.functional.cross_entropy(logits, target, weight=class_weight_tensor(class_weights, logits),
                                       reduction=reduction, label_smoothing=label_smoothing)


def class_weight_tensor(class_weights: tuple[float, ...] | None, logits: torch.Tensor) -> torch.Tensor | None:
    """``class_weights`` as ``F.cross_entropy``'s ``weight`` for ``logits`` (their dtype and device), checked
    against the number of classes; None stays None."""
    if class_weights is None:
        return None
    if len(class_weights) != logits.shape[-1]:
        raise FedleakError(f"class_weights has {len(class_weights)} entries, but the model has {logits.shape[-1]} "
                           "classes: give one weight per class")
    return torch.tensor(class_weights, dtype=logits.dtype, device=logits.device)


def predicted_classes(logits: torch.Tensor, *, probability: bool = False) -> torch.Tensor:
    """The classes the outputs :func:`client_loss` is taken on predict: the largest logit; for a single output,
    class 1 where the logit is above 0 (or, ``probability``, the sigmoid's output above 1/2)."""
    if logits.shape[1] > 1:
        return logits.argmax(1)
    return (logits[:, 0] > (0.5 if probability else 0.0)).long()


def model_predictions(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The classes ``model`` predicts for ``inputs`` (:func:`predicted_classes` of its outputs: a binary classifier's
    one logit, squeezed or not, or the probability its final sigmoid gives, too); call it without autograd."""
    outputs = per_sample_logits(model(inputs), len(inputs))
    return predicted_classes(outputs, probability=ends_in_sigmoid(model, outputs))


def ends_in_sigmoid(model: nn.Module, outputs: torch.Tensor) -> bool:
    """Whether a single-output ``model`` gives a probability: its forward ends with a sigmoid."""
    from fedleak.sigmoid_output import logit_model

    return outputs.shape[1] == 1 and (logit := logit_model(model)) is not None and logit.sigmoid


def check_loss_read(attacks: Iterable[str], stacks: Iterable[DefenseStack], loss: ClientLoss) -> None:
    """Refuse a client ``loss`` a run cannot carry through: an attack of ``attacks`` that reads only a plain
    cross-entropy's update (its registry entry's ``takes_loss``), or a stack of ``stacks`` with a step defense
    (DP-SGD), whose per-sample gradients are of the plain cross-entropy. The plain loss passes."""
    if loss.plain:
        return
    from fedleak.attacks.registry import check_takes_loss

    for attack in attacks:
        check_takes_loss(attack, loss.describe())
    for stack in stacks:
        stack.check_loss(loss)
