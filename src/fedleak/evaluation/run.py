"""Run a defense evaluation: every defense setting's leakage under every attack, its utility and its cost.

:func:`evaluate` trains one small federation per defense setting (utility, client time, bytes sent, ε) and
attacks the round-1 updates of defended clients (leakage), keeping every finished cell in the output folder
so an interrupted run resumes (:mod:`fedleak.evaluation.store`). The federation every cell shares is
:mod:`fedleak.evaluation.federation`'s; the attacked updates and their scores, :mod:`fedleak.evaluation.leakage`'s.
"""

from __future__ import annotations

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
from fedleak.defenses.base import Accounting
from fedleak.defenses.stack import DefenseStack
from fedleak.evaluation.cells import Cell, DefenseRow, LeakageCell, UtilityCell, pareto_front
from fedleak.evaluation.federation import Federation, bind_defenses, local_batches, prepare_federation
from fedleak.evaluation.leakage import attack_cell, attack_variants, client_updates
from fedleak.evaluation.settings import EvaluationSettings
from fedleak.evaluation.store import FILE, CellStore
from fedleak.model_copy import copy_model


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


# ---------------------------------------------------------------------------------------------------------
# Utility: a small federation (FedSGD, or FedAvg with several local steps) trained through the defenses


def train_federation(settings: EvaluationSettings, fed: Federation, stack: DefenseStack) -> UtilityCell:
    """``rounds`` rounds: each client ``local_steps`` defended steps of its optimizer, each on a fresh batch; the
    server adds the mean of what is sent (plus the noise of a central-DP defense, as Flower's server wrapper
    does) and, as Flower's FedAvg averages every array of the state it receives, takes the mean of the clients'
    buffers (BatchNorm's running statistics). Accuracy is the global model's in eval mode."""
    label, stack = stack.label, bind_defenses(stack, fed)
    global_model = copy_model(fed.model)
    params = dict(global_model.named_parameters())
    buffers = {n: b for n, b in global_model.state_dict().items() if n not in params}
    seconds, sizes, losses = [], [], []
    for rnd in range(settings.rounds):
        sent_sum = {n: torch.zeros_like(p) for n, p in params.items()}
        buffer_sum = {n: torch.zeros_like(b, dtype=torch.float64) for n, b in buffers.items()}
        for c, part in enumerate(fed.parts):
            rng = np.random.default_rng([settings.seed, rnd, c])
            batches = local_batches(fed.train, part, settings.batch_size, settings.local_steps, rng)
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
