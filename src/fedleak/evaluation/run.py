"""Run a defense evaluation: every defense setting's leakage under every attack, its utility and its cost.

:func:`evaluate` trains one small federation per defense setting (utility, client time, bytes sent, ε) and
attacks the round-1 updates of defended clients (leakage), keeping every finished cell in the output folder
so an interrupted run resumes (:mod:`fedleak.evaluation.store`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedleak.autograd_mode import with_autograd
from fedleak.client_loss import model_predictions
from fedleak.clients.defended import defended_local_round
from fedleak.clients.mode import client_mode
from fedleak.data import Dataset, load_dataset
from fedleak.data.holdout import held_out_size, split_order
from fedleak.defenses.base import Accounting
from fedleak.defenses.stack import DefenseStack
from fedleak.errors import DataError, FedleakError
from fedleak.evaluation.cells import Cell, DefenseRow, LeakageCell, UtilityCell, pareto_front
from fedleak.evaluation.settings import CLIENT_SIZE, TEST_SIZE, EvaluationSettings
from fedleak.evaluation.store import FILE, CellStore
from fedleak.model_copy import copy_model
from fedleak.updates import GradientUpdate, WeightUpdate


@dataclass(frozen=True)
class Evaluation:
    """An evaluation's results: one :class:`DefenseRow` per defense setting (the baseline first), every cell,
    the settings on the leakage-utility Pareto front, and the run's provenance."""

    settings: EvaluationSettings
    dataset: str
    model: str
    rows: tuple[DefenseRow, ...]
    cells: tuple[Cell, ...]
    pareto: tuple[str, ...]
    seconds: float
    resumed: int = 0  # cells reused from an interrupted run
    test_size: int = 0  # the test samples and ...
    client_size: int = 0  # ... each client's samples it ran with (the settings' own, or what fit the data)

    def problems(self) -> tuple[str, ...]:
        """Per attack that gave up on some attacked batches: on how many, and its first reason (the leakage
        numbers leave those batches out: an attack that cannot read the model rebuilt nothing, and says why)."""
        given_up: dict[str, tuple[int, int, str]] = {}
        for cell in self.cells:
            if isinstance(cell, LeakageCell):
                failed, tried, why = given_up.get(cell.attack, (0, 0, ""))
                given_up[cell.attack] = (failed + len(cell.errors), tried + self.settings.trials,
                                         why or next(iter(cell.errors), ""))
        return tuple(f"{attack}: no result on {failed} of {tried} attacked batches ({why})"
                     for attack, (failed, tried, why) in given_up.items() if failed)

    def to_dict(self) -> dict[str, object]:
        return {"settings": self.settings.to_dict(), "dataset": self.dataset, "model": self.model,
                "test_size": self.test_size, "client_size": self.client_size,
                "rows": [r.to_dict() for r in self.rows], "cells": [c.to_dict() for c in self.cells],
                "pareto": list(self.pareto), "seconds": self.seconds, "resumed_cells": self.resumed}


@dataclass(frozen=True)
class Federation:
    """The data and model every cell of one evaluation shares."""

    train: Dataset
    test_x: torch.Tensor
    test_y: torch.Tensor
    parts: tuple[np.ndarray, ...]  # each client's sample indices into train
    model: nn.Module
    model_name: str


def prepare_federation(settings: EvaluationSettings, model: nn.Module | None) -> Federation:
    """The data, test set, client partitions and model every cell of an evaluation with ``settings`` shares."""
    train = load_dataset(settings.data)
    unset = (f"left unset, the test set is a fifth of the data held out (at most {TEST_SIZE}) and each client gets "
             f"an equal share of the rest (at most {CLIENT_SIZE})")
    if settings.test_data is None:
        test_size = held_out_size(len(train), TEST_SIZE) if settings.test_size is None else settings.test_size
        pool = len(train) - test_size
    else:
        test = load_dataset(settings.test_data)
        if test.input_shape != train.input_shape or test.num_classes != train.num_classes:
            raise DataError(f"{test.name} does not match {train.name} (input shape or classes)")
        test_size = min(TEST_SIZE, len(test)) if settings.test_size is None else settings.test_size
        if test_size > len(test):
            raise DataError(f"{test.name} has {len(test)} samples: too few for test_size={test_size}")
        pool = len(train)
    client_size = min(CLIENT_SIZE, pool // settings.clients) if settings.client_size is None else settings.client_size
    held = f" and {test_size} held-out test samples" if settings.test_data is None else ""
    if test_size < 1 or client_size < settings.batch_size or pool < settings.clients * client_size:
        raise DataError(f"{train.name} has {len(train)} samples: too few for {settings.clients} clients x "
                        f"{client_size} (batches of {settings.batch_size}){held} ({unset})")
    if settings.test_data is None:
        order = split_order(train.y, test_size)  # a data set sorted by class: a fixed shuffle
        if order is not None:
            train = replace(train, x=train.x[order], y=train.y[order])
        test_x, test_y = train.x[-test_size:], train.y[-test_size:]
    else:
        order = split_order(test.y, test_size, at_end=False)
        chosen = slice(test_size) if order is None else order[:test_size]
        test_x, test_y = test.x[chosen], test.y[chosen]
    need = settings.clients * client_size
    order = np.random.default_rng([settings.seed, 7]).permutation(pool)[:need]
    parts = tuple(order[i * client_size:(i + 1) * client_size] for i in range(settings.clients))
    net, name = _model(settings, train, model)
    return Federation(train, test_x, test_y, parts, net, name)


def _model(settings: EvaluationSettings, data: Dataset, model: nn.Module | None) -> tuple[nn.Module, str]:
    if model is not None:
        return model, type(model).__name__
    if settings.model is not None:
        from fedleak.models.zoo import load_model

        loaded = load_model(settings.model, seed=settings.seed)
        return loaded.module, loaded.name
    if settings.conv:
        from fedleak.models.convnet import make_convnet

        net = make_convnet(data.input_shape, data.num_classes, channels=settings.conv, fc_widths=settings.widths,
                           padding=1, seed=settings.seed)
        return net, f"CNN conv {list(settings.conv)} + FC {list(settings.widths)}"
    from fedleak.models import make_mlp

    return make_mlp(data.input_shape, list(settings.widths), data.num_classes, seed=settings.seed), \
        f"MLP {list(settings.widths)}"


def _bound(stack: DefenseStack, fed: Federation) -> DefenseStack:
    return stack.bind(data_range=fed.train.value_range, num_classes=fed.train.num_classes,
                      normalization=fed.train.normalization)


# ---------------------------------------------------------------------------------------------------------
# Utility: a small FedSGD federation trained through the defenses


def train_federation(settings: EvaluationSettings, fed: Federation, stack: DefenseStack) -> UtilityCell:
    """``rounds`` rounds: each client ``local_steps`` defended steps of its optimizer, each on a fresh batch; the
    server adds the mean of what is sent (plus the noise of a central-DP defense, as Flower's server wrapper
    does) and, as Flower's FedAvg averages every array of the state it receives, takes the mean of the clients'
    buffers (BatchNorm's running statistics). Accuracy is the global model's in eval mode."""
    label, stack = stack.label, _bound(stack, fed)
    global_model = copy_model(fed.model)
    params = dict(global_model.named_parameters())
    buffers = {n: b for n, b in global_model.state_dict().items() if n not in params}
    seconds, sizes, losses = [], [], []
    for rnd in range(settings.rounds):
        sent_sum = {n: torch.zeros_like(p) for n, p in params.items()}
        buffer_sum = {n: torch.zeros_like(b, dtype=torch.float64) for n, b in buffers.items()}
        for c, part in enumerate(fed.parts):
            rng = np.random.default_rng([settings.seed, rnd, c])
            batches = _local_batches(fed.train, part, settings.batch_size, settings.local_steps, rng)
            client = copy_model(global_model)
            gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
            with torch.random.fork_rng(devices=[]), client_mode(client, settings.client_mode):
                torch.manual_seed(int(rng.integers(2**62)))
                local = defended_local_round(client, batches, stack, lr=settings.lr, generator=gen,
                                             loss=settings.loss, optimizer=settings.local_optimizer)
            for n in sent_sum:
                sent_sum[n] += local.sent[n]
            state = client.state_dict()
            for n in buffer_sum:
                buffer_sum[n] += state[n].double()
            seconds.append(local.seconds)
            sizes.append(local.sent_bytes)
            losses.append(local.loss)
        noise = stack.aggregate_noise(len(fed.parts))  # the server's share of a central-DP defense
        server = torch.Generator().manual_seed(int(np.random.default_rng([settings.seed, rnd, 99]).integers(2**62)))
        with torch.no_grad():
            for n, p in params.items():
                mean = sent_sum[n] / len(fed.parts)
                if noise > 0:
                    mean = mean + noise * torch.randn(mean.shape, generator=server, dtype=mean.dtype)
                p -= mean
            for n, b in buffers.items():
                b.copy_((buffer_sum[n] / len(fed.parts)).to(b.dtype))
    with torch.no_grad(), client_mode(global_model, "eval"):
        pred = model_predictions(global_model, stack.at_inference(fed.test_x))
    accuracy = float((pred == fed.test_y).float().mean())
    accounting = Accounting(rounds=settings.rounds, local_steps=settings.local_steps, batch_size=settings.batch_size,
                            dataset_size=len(fed.parts[0]), client_rate=1.0, delta=settings.delta)
    privacy = tuple(p.to_dict() for p in stack.privacy(accounting))
    tail = losses[-len(fed.parts):]
    return UtilityCell(label, accuracy, float(np.mean(tail)), float(np.median(seconds)), float(np.mean(sizes)),
                       privacy)


# ---------------------------------------------------------------------------------------------------------
# Leakage: defended round-1 updates, attacked


def _local_batches(data: Dataset, part: np.ndarray, size: int, steps: int, rng: np.random.Generator
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` batches of ``size`` samples of a client's ``part``: distinct within a batch, and across the batches
    while the part holds enough (as an epoch's batches are), else drawn afresh for each."""
    if size * steps <= len(part):
        chosen = np.split(part[rng.choice(len(part), size=size * steps, replace=False)], steps)
    else:
        chosen = [part[rng.choice(len(part), size=size, replace=False)] for _ in range(steps)]
    return [(data.x[idx], data.y[idx]) for idx in (torch.from_numpy(c) for c in chosen)]


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
    stack = _bound(stack, fed)
    out = []
    for t in range(settings.trials):
        part = fed.parts[t % len(fed.parts)]
        rng = np.random.default_rng([settings.seed, 1_000 + t])
        batches = _local_batches(fed.train, part, settings.attack_batch, settings.local_steps, rng)
        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        try:
            client = copy_model(fed.model)
            before = _weights(client)
            with torch.random.fork_rng(devices=[]), client_mode(client, settings.client_mode):
                torch.manual_seed(int(rng.integers(2**62)))
                local = defended_local_round(client, batches, stack, lr=settings.lr, generator=gen,
                                             loss=settings.loss, optimizer=settings.local_optimizer)
            count = int(local.inputs.shape[0])
            update: GradientUpdate | WeightUpdate
            if settings.upload == "weights":
                update = WeightUpdate(before, _weights(client), num_examples=count,
                                      learning_rate=settings.lr if settings.lr_known else None)
            else:  # one step's change: the gradient where the server knows the rate, else at an unknown scale
                scale = settings.lr if settings.lr_known else 1.0
                update = GradientUpdate({n: v / scale for n, v in local.sent.items()}, num_examples=count)
            out.append(Trial(x, y, local.inputs, local.labels, update))
        except FedleakError as exc:
            out.append(Trial(x, y, None, None, str(exc)))
    return out


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a FedAvg client's reply carries: its whole state (weights, and buffers such as BatchNorm's)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


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
    data, bound = fed.train, _bound(stack, fed)
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


# ---------------------------------------------------------------------------------------------------------


@with_autograd
def evaluate(
    settings: EvaluationSettings | None = None,
    *,
    out: str | Path | None = None,
    model: nn.Module | None = None,
    progress: Callable[[Iterator], Iterator] | None = None,
    **overrides: object,
) -> Evaluation:
    """Evaluate every defense setting of ``settings`` (fields may also be given as keyword arguments) against
    every attack: leakage, utility after federated training, cost and ε.

    With ``out`` each finished cell is kept in ``out/cells.jsonl`` as it completes: a run interrupted and
    started again with the same settings reuses them (:mod:`fedleak.evaluation.store`). ``model`` overrides the
    one the settings name (a user's module; it is copied, never trained in place).
    """
    start = time.perf_counter()
    settings = replace(settings or EvaluationSettings(), **overrides) if overrides else \
        (settings or EvaluationSettings())
    fed = prepare_federation(settings, model)
    store = None
    if out is not None:
        from fedleak.report.output import prepare_output_dir

        store = CellStore(prepare_output_dir(out) / FILE, {**settings.to_dict(), "model_name": fed.model_name})
    resumed = len(store.cells) if store is not None else 0
    grid = settings.grid()
    jobs = [(stack, kind) for stack in grid for kind in ("utility", "leakage")]
    rows, cells = [], []
    iterator = progress(iter(jobs)) if progress else iter(jobs)
    utilities: dict[str, UtilityCell] = {}
    for stack, kind in iterator:
        if kind == "utility":
            cell = _cached(store, ("utility", stack.label, ""), lambda: train_federation(settings, fed, stack))
            utilities[stack.label] = cell  # type: ignore[assignment]
            cells.append(cell)
            continue
        variants = [(a, label, aware) for a in settings.attacks for label, aware in attack_variants(a, stack)]
        pending = [v for v in variants if store is None or store.get(("leakage", stack.label, v[1])) is None]
        trials = client_updates(settings, fed, stack) if pending else []
        leak = []
        for attack, label, aware in variants:
            leak.append(_cached(store, ("leakage", stack.label, label),
                                lambda a=attack, lab=label, aw=aware: attack_cell(settings, fed, stack, a, aw, trials,
                                                                                  lab)))
        cells.extend(leak)
        rows.append((stack.label, tuple(leak)))
    baseline = utilities["none"]
    table = tuple(DefenseRow(label, leak, utilities[label], baseline) for label, leak in rows)  # type: ignore[arg-type]
    return Evaluation(settings, fed.train.name, fed.model_name, table, tuple(cells), tuple(pareto_front(table)),
                      time.perf_counter() - start, resumed, len(fed.test_y), len(fed.parts[0]))


def _cached(store: CellStore | None, key: tuple[str, str, str], compute: Callable[[], Cell]) -> Cell:
    if store is not None:
        found = store.get(key)
        if found is not None:
            return found
    cell = compute()
    return store.add(cell) if store is not None else cell
