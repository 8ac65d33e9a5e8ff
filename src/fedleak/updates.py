"""What a federated client sends: typed updates, and how to compute them.

* :class:`GradientUpdate` is a FedSGD update: the gradient of the batch's *mean* cross-entropy loss,
  keyed like ``model.named_parameters()``.
* :class:`WeightUpdate` is a FedAvg update: the weights before and after the client's local training.

:mod:`fedleak.update_files` stores and reads them; :mod:`fedleak.captured` reads what a server captured as it
comes (a list of tensors, a client's weights); :mod:`fedleak.client_loss` is the loss they are the gradient of.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from fedleak.autograd_mode import with_autograd
from fedleak.client_loss import check_class_weights, check_label_smoothing, client_loss, ends_in_sigmoid, is_soft
from fedleak.errors import DataError, FedleakError, ModelError, UpdateError
from fedleak.focal import check_focal_gamma
from fedleak.forward_failure import ONE_INPUT_REMEDY, forward_failure
from fedleak.logits_of import per_sample_logits
from fedleak.state_names import renaming
from fedleak.validation import (
    MAX_COUNT,
    all_finite,
    check_batch,
    check_float,
    check_int,
    check_labels,
    check_model,
    check_num_classes,
)


def _check_tensor_map(tensors: Mapping[str, torch.Tensor], what: str, *,
                      counters: bool = False) -> dict[str, torch.Tensor]:
    """Finite floating-point tensors by name; with ``counters``, integer tensors too (a state dict's counters,
    such as BatchNorm's ``num_batches_tracked``)."""
    if not isinstance(tensors, Mapping) or not tensors:
        raise UpdateError(f"{what} must be a non-empty mapping from parameter name to tensor")
    out: dict[str, torch.Tensor] = {}
    if all(v is None for v in tensors.values()):
        raise UpdateError(f"{what} holds no tensor (every entry is None)")
    for name, value in tensors.items():
        if value is None and not counters:  # a parameter's .grad where no gradient reached it: none sent
            continue
        if not isinstance(value, torch.Tensor):
            raise UpdateError(f"{what}['{name}'] is a {type(value).__name__}, not a torch.Tensor")
        counter = counters and not value.is_floating_point() and not value.is_complex() and value.dtype != torch.bool
        if not value.is_floating_point() and not counter:
            raise UpdateError(f"{what}['{name}'] has dtype {value.dtype}; a floating-point tensor is needed")
        if not counter and not all_finite(value):
            bad = int((~torch.isfinite(value)).sum())
            raise UpdateError(f"{what}['{name}'] holds {bad} non-finite value(s) (NaN or inf)")
        out[str(name)] = value.detach()
    return out


def check_count(name: str, value: object) -> int | None:
    """A count a client reports (``num_examples``, ``local_steps``): ``None`` or a whole number in [1, MAX_COUNT]."""
    return None if value is None else check_int(name, value, low=1, high=MAX_COUNT, error=UpdateError)


@dataclass(frozen=True)
class GradientUpdate:
    """A FedSGD client update: the averaged gradient of the batch's mean cross-entropy loss (for a summed loss
    the exclusivity attack takes ``loss_reduction="sum"``).

    ``num_examples`` is what the client reveals about its batch size, if anything (``None``: nothing).
    ``error``: a known bound on every entry's absolute error on its way to the server, beyond the client's own
    float rounding (e.g. secure aggregation's quantization); the attacks' certificates widen their tolerances
    by it, so a larger error certifies less, never wrongly.
    """

    gradients: Mapping[str, torch.Tensor]
    num_examples: int | None = None
    error: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "gradients", _check_tensor_map(self.gradients, "gradient"))
        object.__setattr__(self, "num_examples", check_count("num_examples", self.num_examples))
        object.__setattr__(self, "error", check_error(self.error))


@dataclass(frozen=True)
class WeightUpdate:
    """A FedAvg client update: the model's weights before and after local training.

    What a real client reveals: its new weights and, usually, its number of examples. ``local_steps``
    is only set when the threat model grants the server that knowledge. ``error``: a known bound on the absolute
    error of every entry of ``before - after`` beyond float rounding (see :class:`GradientUpdate`).
    ``learning_rate``: the learning rate of the client's local SGD, where the server knows it (it sets it in the
    round's configuration); the exact route then reads one step's change at the gradient's own scale.
    """

    before: Mapping[str, torch.Tensor]
    after: Mapping[str, torch.Tensor]
    num_examples: int | None = None
    local_steps: int | None = None
    metadata: Mapping[str, object] = field(default_factory=dict)
    error: float = 0.0
    learning_rate: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "error", check_error(self.error))
        if self.learning_rate is not None:
            object.__setattr__(self, "learning_rate", check_learning_rate(self.learning_rate))
        before = _check_tensor_map(self.before, "before", counters=True)
        after = _check_tensor_map(self.after, "after", counters=True)
        if set(before) != set(after):
            missing = sorted(set(before) - set(after))
            extra = sorted(set(after) - set(before))
            raise UpdateError(f"before/after weights differ in keys: missing after {missing}, extra after {extra}")
        for name in before:
            if before[name].shape != after[name].shape:
                raise UpdateError(
                    f"'{name}' has shape {tuple(before[name].shape)} before and {tuple(after[name].shape)} after"
                )
        if all(torch.equal(before[n], after[n]) for n in before):
            raise UpdateError("the weight update is zero: before and after weights are identical")
        object.__setattr__(self, "before", before)
        object.__setattr__(self, "after", after)
        object.__setattr__(self, "num_examples", check_count("num_examples", self.num_examples))
        object.__setattr__(self, "local_steps", check_count("local_steps", self.local_steps))

    def delta(self) -> dict[str, torch.Tensor]:
        """``before - after`` of every floating-point entry: for one plain SGD step this is the learning rate
        times the gradient (a state dict's integer counters are left out)."""
        return {name: self.before[name] - self.after[name] for name in self.before
                if self.before[name].is_floating_point()}

    def parameters_of(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``before`` of ``model``'s trainable parameters, checked against them (:func:`check_matches_model`);
        the other entries must be the model's own buffers or frozen parameters (a state dict, as Flower's clients
        send it)."""
        params = trainable_parameters(model)
        known = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
        unknown = sorted(set(self.before) - known)
        if unknown:
            raise UpdateError(f"the weight update does not match the model: unexpected {unknown}"
                              + renaming_hint(sorted(set(params) - set(self.before)), unknown))
        chosen = {k: v for k, v in self.before.items() if k in params}
        check_matches_model(model, chosen, "weight update")
        return chosen


ClientUpdate = GradientUpdate | WeightUpdate


def check_learning_rate(value: object) -> float:
    """A client's learning rate: a positive finite number (:class:`UpdateError` otherwise)."""
    lr = check_float("learning_rate", value, error=UpdateError)
    if lr <= 0:
        raise UpdateError(f"learning_rate must be a positive number (the client's SGD step size), got {value!r}")
    return lr


def check_error(error: float) -> float:
    """An update's transport-error bound: a finite number >= 0 (:class:`UpdateError` otherwise)."""
    try:
        value = float(error)
    except (TypeError, ValueError):
        raise UpdateError(f"an update's error bound must be a number >= 0, got {error!r}") from None
    if not math.isfinite(value) or value < 0:
        raise UpdateError(f"an update's error bound must be a finite number >= 0, got {error!r}")
    return value


def trainable_parameters(model: nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def check_matches_model(model: nn.Module, tensors: Mapping[str, torch.Tensor], what: str = "update") -> None:
    """Raise :class:`UpdateError` unless ``tensors`` has exactly the model's parameter names and shapes."""
    params = trainable_parameters(model)
    missing = sorted(set(params) - set(tensors))
    extra = sorted(set(tensors) - set(params))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if extra:
            parts.append(f"unexpected {extra}")
        hint = renaming_hint(missing, extra) or (
            " (a client that trains only some layers sends only theirs: freeze the same ones in the model, "
            "requires_grad_(False))" if missing and not extra else "")
        raise UpdateError(f"the {what} does not match the model's parameters: " + "; ".join(parts) + hint)
    for name, p in params.items():
        if tuple(tensors[name].shape) != tuple(p.shape):
            raise UpdateError(
                f"the {what}'s '{name}' has shape {tuple(tensors[name].shape)} but the model's parameter "
                f"has shape {tuple(p.shape)}"
            )


def renaming_hint(missing: list[str], extra: list[str]) -> str:
    """What to do when the update's names are the model's with one prefix added or removed (a model wrapped in
    ``DataParallel``/``DistributedDataParallel`` names its parameters ``module.<name>``), else empty."""
    change = renaming(extra, missing) if missing and len(missing) == len(extra) else None
    if change is None:
        return ""
    return (" (" + change.said("the update's") + ": pass the update as a plain dict or file, which fedleak reads "
            "with the model's names, or rename it)")


def in_model_dtype(model: nn.Module, update: object) -> object:
    """``update`` (a :class:`GradientUpdate`, a :class:`WeightUpdate` or a dict of tensors) with every entry in a
    finer floating-point dtype than its parameter's read back in the parameter's dtype, the one its client computed
    in: a float32 model's update sent as float64 (numpy's default, a serialiser's) was rounded in float32, exactly
    so where it was only cast, and the attacks then allow for float32's rounding, not float64's. An entry in a
    coarser dtype (float16 on the way) keeps it: its rounding is the update's. Anything else is returned as it is."""
    dtypes = {name: t.dtype for name, t in (*model.named_parameters(), *model.named_buffers())}

    def narrowed(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        def finer(name: str, t: object) -> bool:
            own = dtypes.get(name)
            return (isinstance(t, torch.Tensor) and own is not None and t.is_floating_point()
                    and own.is_floating_point and torch.finfo(t.dtype).eps < torch.finfo(own).eps)

        return {name: t.to(dtypes[name]) if finer(name, t) else t for name, t in tensors.items()}

    def changed(old: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]) -> bool:
        return any(new[name] is not old[name] for name in new)

    if isinstance(update, GradientUpdate):
        grads = narrowed(update.gradients)
        return replace(update, gradients=grads) if changed(update.gradients, grads) else update
    if isinstance(update, WeightUpdate):
        before, after = narrowed(update.before), narrowed(update.after)
        if changed(update.before, before) or changed(update.after, after):
            return replace(update, before=before, after=after)
        return update
    if isinstance(update, Mapping):
        return narrowed(update)
    return update


def as_gradient_update(update: GradientUpdate | Mapping[str, torch.Tensor]) -> GradientUpdate:
    """Accept a :class:`GradientUpdate` or a plain mapping from parameter name to gradient."""
    if isinstance(update, GradientUpdate):
        return update
    if isinstance(update, WeightUpdate):
        raise UpdateError("expected a gradient update, got a WeightUpdate")
    if isinstance(update, Mapping):
        return GradientUpdate(update)
    raise UpdateError("an update must be a GradientUpdate, a WeightUpdate or a dict of tensors; "
                      f"got {type(update).__name__}")


def check_client_batch(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> nn.Module:
    """A usable model (returned unwrapped: :func:`~fedleak.validation.check_module`) and a non-empty, finite batch
    with one label per sample (checked against the logits by :func:`forward_logits`); soft labels must be rows of
    class probabilities. A model with one logit is a binary classifier (:func:`client_loss`)."""
    model = check_model(model, binary=True)
    if is_soft(labels):
        check_batch(inputs, None)
        if labels.shape[0] != inputs.shape[0]:
            raise DataError(f"soft labels must have one row per sample ({inputs.shape[0]}), got {labels.shape[0]}")
        if not torch.isfinite(labels).all() or bool((labels < 0).any()) or \
                not torch.allclose(labels.sum(1), torch.ones(len(labels), dtype=labels.dtype), atol=1e-4):
            raise DataError("soft labels must be finite, non-negative rows that sum to 1")
        return model
    check_batch(inputs, labels)
    return model


def forward_logits(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``model(inputs)``, checked to be N x K logits (K >= 2) with every label a class index below K (or soft
    labels with K columns), or N x 1 of a binary classifier: one that squeezes its logit to N values
    (``self.fc(h).squeeze(1)``, as ``BCEWithLogitsLoss`` on float labels takes it) gives them as N x 1."""
    try:
        logits = per_sample_logits(model(inputs), int(inputs.shape[0]))
    except Exception as exc:  # a shape or dtype mismatch anywhere in the user's forward; BatchNorm on one input
        if isinstance(exc, FedleakError):
            raise
        raise ModelError(forward_failure(model, inputs, exc, remedy=ONE_INPUT_REMEDY)) from None
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != inputs.shape[0]:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ModelError(f"the model must return logits of shape ({inputs.shape[0]}, K), got {shape}")
    classes = int(logits.shape[1])
    if classes != 1:  # one logit: a binary classifier (client_loss), whose labels are 0 or 1
        check_num_classes(classes, "the model")
    if is_soft(labels):  # a binary classifier's one logit takes soft labels of two classes (client_loss)
        if labels.shape[1] != max(classes, 2):
            raise DataError(f"soft labels have {labels.shape[1]} classes but the model {classes} outputs")
    else:
        check_labels(labels, max(classes, 2), error=DataError)
    return logits


def batch_loss(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, reduction: str = "mean", *,
               label_smoothing: float = 0.0, class_weights: tuple[float, ...] | None = None,
               focal_gamma: float = 0.0) -> torch.Tensor:
    """The client's loss (:func:`client_loss`) of the model on a checked batch."""
    dtype = next(model.parameters()).dtype
    outputs = forward_logits(model, inputs.to(dtype), labels)
    return client_loss(outputs, labels, reduction, probability=ends_in_sigmoid(model, outputs),
                       label_smoothing=label_smoothing, class_weights=class_weights, focal_gamma=focal_gamma)


@with_autograd
def compute_gradient_update(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, *,
                            label_smoothing: float = 0.0,
                            class_weights: Sequence[float] | None = None,
                            focal_gamma: float = 0.0) -> GradientUpdate:
    """The FedSGD update of one batch: torch autograd of the mean cross-entropy loss (binary cross-entropy for a
    model with one logit), with ``label_smoothing`` and ``class_weights`` as ``F.cross_entropy`` takes them
    (``label_smoothing``, ``weight``), or the focal loss of exponent ``focal_gamma`` (:mod:`fedleak.focal`; the
    exclusivity attack then takes the same options).

    ``labels`` are class indices, or soft labels (an ``M x K`` float tensor of class probabilities, what MixUp
    and InstaHide send). The model's own ``.grad`` fields are left untouched. ``num_examples`` is recorded
    because real clients report it; attacks that should not know it simply ignore it. Frozen parameters
    (``requires_grad=False``) get no gradient, as on a real client.
    """
    model = check_client_batch(model, inputs, labels)
    if not trainable_parameters(model):
        raise ModelError("the model has no trainable parameters (every parameter has requires_grad=False)")
    smoothing = check_label_smoothing(label_smoothing)
    weights = check_class_weights(class_weights, label_smoothing=smoothing)
    gamma = check_focal_gamma(focal_gamma, label_smoothing=smoothing, class_weights=weights)
    grads = batch_gradients(model, inputs, labels, label_smoothing=smoothing, class_weights=weights, focal_gamma=gamma)
    return GradientUpdate(grads, num_examples=int(inputs.shape[0]))


def batch_gradients(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, *, label_smoothing: float = 0.0,
                    class_weights: tuple[float, ...] | None = None, focal_gamma: float = 0.0
                    ) -> dict[str, torch.Tensor]:
    """The gradients of the mean client loss (:func:`batch_loss`) of a model, batch and options the caller has
    checked (:func:`compute_gradient_update` checks them), one per trainable parameter, each a tensor of its own;
    inside autograd (:func:`~fedleak.autograd_mode.with_autograd`)."""
    params = trainable_parameters(model)
    loss = batch_loss(model, inputs, labels, label_smoothing=label_smoothing, class_weights=class_weights,
                      focal_gamma=focal_gamma)
    grads = torch.autograd.grad(loss, list(params.values()), materialize_grads=True)  # 0 where forward reads none
    return dict(zip(params, owned(grads)))


def owned(grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``grads`` as tensors of their own: autograd's results are fresh, except one passed on to several parameters
    (the same tensor) or expanded from a scalar (a stride-0 view), which are copied."""
    seen: set[int] = set()
    out = []
    for g in grads:
        storage = g.untyped_storage().data_ptr()
        out.append(g.detach().clone(memory_format=torch.contiguous_format)
                   if storage in seen or not g.is_contiguous() else g.detach())
        seen.add(storage)
    return out
