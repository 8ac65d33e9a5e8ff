"""The entry point that runs any registered attack on a client update."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from fedleak.attacks.registry import attack_specs, get_attack
from fedleak.autograd_mode import with_autograd
from fedleak.captured import as_attacked
from fedleak.errors import FedleakError, OptionError
from fedleak.reconstruction import Reconstruction
from fedleak.update_facts import with_facts
from fedleak.updates import GradientUpdate, WeightUpdate
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
    ``fedleak.available_attacks()``); ``data_range=(low, high)``, the range the client's inputs live on (data
    normalised as the model expects: e.g. ``(-1, 1)`` for mean and std 0.5, Flower's quickstart), to the attacks
    that read it (their registry entry's ``reads_range``): the searches keep their inputs in it ([0, 1] where it is
    not given), the exact attacks' tolerances and proofs are on it.
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
    update, told = with_facts(model, update, num_examples=num_examples, learning_rate=learning_rate,
                              local_steps=local_steps)
    if options.get("input_shape") is not None:
        options["input_shape"] = check_shape("input_shape", options["input_shape"])
    if options.get("data_range") is not None and not info.reads_range:
        reading = sorted(name for name, spec in attack_specs().items() if spec.reads_range)
        raise OptionError(f"attack '{attack}' does not read the data's range (data_range); the attacks that do: "
                          f"{', '.join(reading)}")
    kind = "weights" if isinstance(update, WeightUpdate) else "gradient"
    if kind not in info.update_kinds:
        raise FedleakError(
            f"attack '{attack}' does not run on {kind} updates (it takes: {', '.join(info.update_kinds)})"
        )
    start = time.perf_counter()
    result = info.run(model, update, **options)
    return replace(result, seconds=time.perf_counter() - start, notes=(*result.notes, *read_as, *told))

