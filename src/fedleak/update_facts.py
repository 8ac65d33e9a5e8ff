"""What the server knows of a client's update beyond its numbers, given with it: the number of examples the client
reported, and, for a FedAvg weight update, the learning rate and the local steps of its training
(:func:`with_facts`). :func:`fedleak.reconstruct` and :func:`fedleak.plan` take them alike."""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from fedleak.captured import READ_AS, read_rate_scaled_change
from fedleak.errors import UpdateError
from fedleak.updates import GradientUpdate, WeightUpdate, as_gradient_update, check_count, check_learning_rate


def with_facts(model: nn.Module, update: object, *, num_examples: int | None = None,
               learning_rate: float | None = None, local_steps: int | None = None) -> tuple[object, tuple[str, ...]]:
    """``update`` (as :func:`~fedleak.captured.as_attacked` read it) with the facts given (None: not given), and a
    note on how it was read where a fact changed that: ``num_examples`` for any update; ``learning_rate`` for a
    weight update, or for a one-step weight change divided by it passed as a gradient, read as that change
    (:func:`~fedleak.captured.read_rate_scaled_change`); ``local_steps`` for a weight update. An update that carries
    another value than given is refused (:class:`UpdateError`)."""
    notes: tuple[str, ...] = ()
    if num_examples is not None:
        update = _reported(update, num_examples)
    if learning_rate is not None and not isinstance(update, WeightUpdate):  # a weight change divided by the rate?
        update = read_rate_scaled_change(model, update, check_learning_rate(learning_rate))
        notes = (str(update.metadata[READ_AS]),)
    elif learning_rate is not None:
        update = _told(update, "learning_rate", check_learning_rate(learning_rate))
    if local_steps is not None:
        update = _told(update, "local_steps", check_count("local_steps", local_steps))
    return update, notes


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
