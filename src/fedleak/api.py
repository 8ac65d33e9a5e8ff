"""The entry point that runs any registered attack on a client update."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from fedleak.attacks.registry import get_attack
from fedleak.autograd_mode import with_autograd
from fedleak.captured import READ_AS, as_attacked, read_rate_scaled_change
from fedleak.errors import FedleakError, UpdateError
from fedleak.reconstruction import Reconstruction
from fedleak.updates import GradientUpdate, WeightUpdate, as_gradient_update, check_count, check_learning_rate
from fedleak.validation import check_model, check_module, check_shape


@with_autograd
def reconstruct(
    model: nn.Module,
    update: GradientUpdate | WeightUpdate | Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
    attack: str = "exclusivity",
    *,
    num_examples: int | None = None,
    learning_rate: float | None = None,
    local_steps: int | None = None,
    **options: Any,
) -> Reconstruction:
    """Rebuild a client's batch from its update with the named attack.

    ``update`` is a :class:`GradientUpdate` (FedSGD), a :class:`WeightUpdate` (FedAvg), or simply a dict
    from parameter name to gradient, or a list of gradients in ``model.parameters()`` order; a dict or list of the
    client's weights after local training (a FedAvg reply) is read as a :class:`WeightUpdate` from ``model``'s
    weights, the round's (:func:`~fedleak.captured.read_captured`; the result's notes say so). ``num_examples``:
    the number of examples the client reported (Flower's ``num-examples``), for an update that does not carry it
    (a plain dict or list, a reply); one that carries another number is refused. ``learning_rate``: the learning
    rate of a FedAvg client's local SGD, where the server knows it (it sets it in the round's configuration), for a
    weight update (:attr:`WeightUpdate.learning_rate`), or for a one-step weight change divided by it, passed as a
    gradient (a pseudo-gradient ``(old - new) / lr``: read as that change, where times the rate its entries lie on
    the float spacing of ``model``'s weights; another gradient is refused). ``local_steps``: the number of local SGD
    steps of a FedAvg client, where the server knows it, for a weight update (:attr:`WeightUpdate.local_steps`: one
    step is the exact route's; several go to the first-layer rows and the searches that unroll them). An update that
    carries another rate or step count than given is refused. ``options`` go to the attack (see
    ``fedleak.available_attacks()``).
    The model must be a ``torch.nn.Module`` with finite weights and at least 2 output classes, or one logit
    trained with binary cross-entropy (:mod:`fedleak.binary`: attacked as its two-class twin); otherwise
    :class:`~fedleak.errors.ModelError` says which. A client that trains only some layers sends an update of its
    trainable parameters: the optimisation attacks take it, and so do the exact ones where the frozen layers are
    conv layers (a fine-tuned head on a frozen backbone: they are inverted from their weights). The attack runs
    the same inside the caller's ``torch.no_grad()`` or ``torch.inference_mode()``
    (:func:`~fedleak.autograd_mode.with_autograd`).
    """
    if not isinstance(attack, str):
        raise FedleakError(f"attack must be the name of an attack (a str), got {type(attack).__name__}")
    info = get_attack(attack)
    model = check_module(model)
    # a list keyed by the model, a dict of the client's weights (FedAvg) read from the model's (the round's); one
    # logit and binary cross-entropy: its two-class softmax twin, whose gradient is the same
    model, update, read_as = as_attacked(model, update)
    check_model(model)
    if num_examples is not None:
        update = _reported(update, num_examples)
    if learning_rate is not None and not isinstance(update, WeightUpdate):  # a weight change divided by the rate?
        update = read_rate_scaled_change(model, update, check_learning_rate(learning_rate))
        read_as = (*read_as, str(update.metadata[READ_AS]))
    elif learning_rate is not None:
        update = _told(update, "learning_rate", check_learning_rate(learning_rate))
    if local_steps is not None:
        update = _told(update, "local_steps", check_count("local_steps", local_steps))
    if options.get("input_shape") is not None:
        options["input_shape"] = check_shape("input_shape", options["input_shape"])
    kind = "weights" if isinstance(update, WeightUpdate) else "gradient"
    if kind not in info.update_kinds:
        raise FedleakError(
            f"attack '{attack}' does not run on {kind} updates (it takes: {', '.join(info.update_kinds)})"
        )
    start = time.perf_counter()
    result = info.run(model, update, **options)
    return replace(result, seconds=time.perf_counter() - start, notes=(*result.notes, *read_as))


def _reported(update: object, num_examples: int) -> GradientUpdate | WeightUpdate:
    """``update`` with the number of examples its client reported (checked as the update checks it)."""
    if not isinstance(update, (GradientUpdate, WeightUpdate)):
        update = as_gradient_update(update)
    if update.num_examples is not None and update.num_examples != num_examples:
        raise UpdateError(f"the update reports {update.num_examples} examples, but num_examples={num_examples!r}; "
                          "pass num_examples only for an update that does not carry it")
    return replace(update, num_examples=num_examples)


def _told(update: object, name: str, value: float | int) -> WeightUpdate:
    """``update``, a weight update, with a fact of its client's local training that the server knows (``name``:
    ``learning_rate`` or ``local_steps``, ``value`` checked as the update checks it)."""
    if not isinstance(update, WeightUpdate):
        raise UpdateError(f"{name} is a fact of a FedAvg client's local training: pass it with a weight update (the "
                          "client's new weights, or a WeightUpdate), not with a gradient")
    held = getattr(update, name)
    if held is not None and held != value:
        raise UpdateError(f"the update carries {name} {held!r}, but {name}={value!r}; pass {name} only for an update "
                          "that does not carry it")
    return replace(update, **{name: value})
