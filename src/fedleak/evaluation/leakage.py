"""An evaluation's leakage: defended clients' round-1 updates (:func:`client_updates`), attacked by every attack
(:func:`attack_cell`), as published and, where the attack can replay the defense, defense-aware
(:func:`attack_variants`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fedleak.clients.defended import defended_local_round
from fedleak.clients.mode import client_mode
from fedleak.defenses.stack import DefenseStack
from fedleak.errors import FedleakError
from fedleak.evaluation.cells import LeakageCell
from fedleak.evaluation.federation import Federation, bind_defenses, local_batches
from fedleak.evaluation.settings import EvaluationSettings
from fedleak.model_copy import copy_model, state_copy
from fedleak.updates import GradientUpdate, WeightUpdate


@dataclass(frozen=True)
class Trial:
    """One attacked client's round: its samples (over every local step), what it trained on after its batch
    defenses (the certificates' reference), and what the server reads from its defended update (the gradient
    ``sent / lr`` of a delta upload, or its weights before and after), or why it sent nothing."""

    x: torch.Tensor
    y: torch.Tensor
    sent_x: torch.Tensor | None
    sent_y: torch.Tensor | None
    update: GradientUpdate | WeightUpdate | str


def client_updates(settings: EvaluationSettings, fed: Federation, stack: DefenseStack) -> list[Trial]:
    """The evaluation's attacked clients, each sending one round of ``local_steps`` steps through ``stack``."""
    stack = bind_defenses(stack, fed)
    out = []
    for t in range(settings.trials):
        part = fed.parts[t % len(fed.parts)]
        rng = np.random.default_rng([settings.seed, 1_000 + t])
        batches = local_batches(fed.train, part, settings.attack_batch, settings.local_steps, rng)
        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        try:
            client = copy_model(fed.model)
            before = state_copy(client)
            with torch.random.fork_rng(devices=[]), client_mode(client, settings.client_mode):
                torch.manual_seed(int(rng.integers(2**62)))
                local = defended_local_round(client, batches, stack, lr=settings.lr, generator=gen,
                                             loss=settings.loss, optimizer=settings.local_optimizer)
            count = int(local.inputs.shape[0])
            update: GradientUpdate | WeightUpdate
            if settings.upload == "weights":
                update = WeightUpdate(before, state_copy(client), num_examples=count,
                                      learning_rate=settings.lr if settings.lr_known else None)
            else:  # one step's change: the gradient where the server knows the rate, else at an unknown scale
                scale = settings.lr if settings.lr_known else 1.0
                update = GradientUpdate({n: v / scale for n, v in local.sent.items()}, num_examples=count)
            out.append(Trial(x, y, local.inputs, local.labels, update))
        except FedleakError as exc:
            out.append(Trial(x, y, None, None, str(exc)))
    return out


AWARE = " (defense-aware)"


def attack_variants(attack: str, stack: DefenseStack) -> tuple[tuple[str, bool], ...]:
    """``(label, defense-aware)`` of each way an attack is run against ``stack``.

    An exact attack always runs defense-aware (it certifies through what it can model and says why not
    otherwise). An optimisation attack runs as published and, when the stack has a filter whose function the
    attacker can replay, also with that forward model in its loss: which of the two leaks more depends on the
    data (a masked-out background stays unconstrained), so both are measured.
    """
    from fedleak.attacks import get_attack

    info = get_attack(attack)
    if not stack or not info.takes_defense:
        return ((attack, False),)
    if info.needs_relu_network:
        return ((attack, True),)
    if any(f.known_function for f in stack.filters):
        return ((attack, False), (attack + AWARE, True))
    return ((attack, False),)


def attack_cell(settings: EvaluationSettings, fed: Federation, stack: DefenseStack, attack: str, aware: bool,
                trials: list[Trial], label: str | None = None) -> LeakageCell:
    """One attack on every trial: leakage scored against the originals (as the client's images show them where a
    batch defense only moves their content: augmentation's flips and shifts), certificates against what was sent
    (a certified exact MixUp mixture is a sound certificate that leaks no original)."""
    from fedleak.api import reconstruct
    from fedleak.attacks import get_attack
    from fedleak.metrics import match

    info = get_attack(attack)
    data, bound = fed.train, bind_defenses(stack, fed)
    options: dict[str, object] = {"iterations": settings.attack_iterations, "seed": settings.seed} \
        if info.optimises else {}
    if aware:
        options["defense"] = bound
    elif info.takes_defense and info.optimises:  # as published: no forward model, none read off the update either
        options["defense"] = "none"
    if attack == "auto":
        options["progress"] = False  # one progress bar: the evaluation's own (as an audit's)
    options.update(settings.loss.options())  # the clients' loss, which every attack takes (checked in the settings)
    recovered = leaked = false = samples = 0
    psnrs, ssims, labels, errors, seconds = [], [], [], [], 0.0
    options["input_shape"] = tuple(data.input_shape)  # the data's: where several fit, inferring one could miss it
    options.update(info.range_option(data.value_range))  # normalised data: the search's box is its range
    for trial in trials:
        samples += len(trial.x)
        if isinstance(trial.update, str):
            errors.append(f"the client sent nothing: {trial.update}")
            continue
        try:
            rec = reconstruct(fed.model, trial.update, attack=attack, **options)
        except FedleakError as exc:
            errors.append(str(exc).splitlines()[0])
            continue
        seconds += rec.seconds
        as_shown = bound.shown(trial.x, rec.inputs)  # a flipped image shows the image
        scores = match(rec, as_shown, trial.y, data_range=data.pixel_range, normalization=data.normalization)
        sent = match(rec, trial.sent_x, trial.sent_y, data_range=data.pixel_range,
                     normalization=data.normalization)
        sel = scores.matched >= 0
        recovered += int(scores.recovered.sum())
        leaked += int((sel & (np.nan_to_num(scores.psnr, nan=-np.inf) >= settings.leak_psnr)).sum())
        false += int(sent.false_certificates)
        psnrs += [float(v) for v in scores.psnr[sel]]
        ssims += [float(v) for v in scores.ssim[sel] if math.isfinite(v)]
        labels.append(scores.label_accuracy)
    mean = (lambda v: float(np.mean(v)) if v else float("nan"))
    return LeakageCell(stack.label, label or attack, samples, recovered, leaked, mean(psnrs), mean(ssims),
                       mean(labels), false, seconds, aware, tuple(errors))
