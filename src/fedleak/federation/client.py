"""What one client does in a round, free of Flower: local training of a fedleak model on its partition.

:func:`local_update` is called by the Flower ClientApp (:mod:`fedleak.federation.client_app`) and can
be tested without Flower.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import nn

from fedleak.clients.defended import defended_local_round
from fedleak.clients.mode import client_mode
from fedleak.defenses.base import Accounting
from fedleak.errors import FedleakError
from fedleak.federation.flower_native import client_side
from fedleak.federation.hooks import get_threat
from fedleak.federation.node_data import NodeData
from fedleak.federation.partition import partition_indices
from fedleak.federation.settings import DataSplit, FederationSettings, data_split, make_model, parse_fault
from fedleak.model_copy import copy_model, state_copy

CLIENT_RATE = 1.0  # the fraction of clients the server samples per round (every client, every round)


@dataclass(frozen=True)
class LocalResult:
    """A client's new weights plus what it reports (``num_examples``) and, for evaluation only, the
    samples it trained on (``inputs`` after any transform and defense, ``original`` before them; ``labels``
    may be soft after MixUp / InstaHide), its compute time and the bytes its update costs on the wire."""

    weights: dict[str, torch.Tensor]
    delta: dict[str, torch.Tensor]  # before - after: what the client sends (after its update filters)
    num_examples: int
    steps: int
    loss: float
    inputs: torch.Tensor
    original: torch.Tensor
    labels: torch.Tensor
    seconds: float = 0.0
    sent_bytes: int = 0


@lru_cache(maxsize=4)
def _partition(settings_key: tuple, data: str, test_size: int, public_size: int, clients: int, scheme: str,
               seed: int, alpha: float, min_size: int) -> list[np.ndarray]:
    split = data_split(data, test_size, public_size)
    return partition_indices(split.train_y, clients, scheme, seed=seed, alpha=alpha, min_size=min_size)


def client_partition(settings: FederationSettings, partition_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    split = data_split(settings.data, settings.test_size, settings.public_size)
    parts = _partition((), settings.data, settings.test_size, settings.public_size, settings.clients,
                       settings.partition, settings.seed, settings.alpha, settings.batch_size)
    if not 0 <= partition_id < len(parts):
        raise FedleakError(f"partition id {partition_id} outside 0..{len(parts) - 1}")
    idx = torch.from_numpy(parts[partition_id])
    return split.train_x[idx], split.train_y[idx]


def _fault(settings: FederationSettings, partition_id: int, server_round: int) -> str | None:
    for text in settings.inject_faults:
        kind, part, rnd = parse_fault(text)
        if part == partition_id and (rnd is None or rnd == server_round):
            return kind
    return None


def _batches(settings: FederationSettings, n: int, partition_id: int, gen: np.random.Generator) -> list[np.ndarray]:
    """The index batches of one round: ``local_steps`` random batches, or ``local_epochs`` shuffled passes."""
    if settings.local_epochs > 0:
        order = np.concatenate([gen.permutation(n) for _ in range(settings.local_epochs)])
        batches = [order[i : i + settings.batch_size] for i in range(0, len(order), settings.batch_size)]
        return [b for b in batches if len(b) == settings.batch_size] or batches[:1]
    if settings.batch_size > n:
        raise FedleakError(f"partition {partition_id} holds {n} samples, fewer than the batch size "
                           f"{settings.batch_size}")
    return [gen.choice(n, size=settings.batch_size, replace=False) for _ in range(settings.local_steps)]


def local_update(model: nn.Module, settings: FederationSettings, partition_id: int, server_round: int,
                 data: NodeData | None = None) -> LocalResult:
    """Train ``model`` (the weights the server sent, changed in place) on the client's partition.

    SGD at ``lr`` (with the settings' momentum and weight decay) through
    :func:`~fedleak.clients.defended.defended_local_round`, the model in training mode or, with
    ``settings.client_mode == "eval"``, in eval mode: per batch the server-shipped transform (threat) runs first,
    then the client's batch defenses and its step defense; its update filters run on the round's change. Defenses
    that Flower realises itself (``local-dp``, ``central-dp``: :mod:`fedleak.federation.flower_native`) are left to
    the ClientApp's mods. Randomised
    defenses are seeded from the run's seed, the round and the partition. ``data``: the node's own samples (a
    SuperNode's folder, :mod:`fedleak.federation.node_data`) instead of its split of the shared data set.
    """
    fault = _fault(settings, partition_id, server_round)
    if fault == "fail":
        raise RuntimeError(f"injected failure of partition {partition_id} in round {server_round}")
    x_all, y_all = client_partition(settings, partition_id) if data is None else (data.x, data.y)
    gen = np.random.default_rng([settings.seed, server_round, partition_id])
    n = len(x_all)
    batches = _batches(settings, n, partition_id, gen)
    split = data_split(settings.data, settings.test_size, settings.public_size) if data is None else data
    stack = client_side(settings.stack).bind(data_range=split.value_range, num_classes=split.num_classes,
                                             normalization=split.normalization)
    shipped = get_threat(settings.threat).transform(settings, split)
    seed = int(gen.integers(2**62))
    before = state_copy(model)
    pairs = ((x_all[torch.from_numpy(np.asarray(b))], y_all[torch.from_numpy(np.asarray(b))]) for b in batches)
    # batch defenses (MixUp, ...) draw from torch's global generator; the model runs as the client's loop runs it
    with torch.random.fork_rng(devices=[]), client_mode(model, settings.client_mode):
        torch.manual_seed(seed)
        done = defended_local_round(model, pairs, stack, lr=settings.lr,
                                    generator=torch.Generator().manual_seed(seed), shipped=shipped,
                                    loss=settings.loss, optimizer=settings.local_optimizer)
    after = state_copy(model)
    delta = {k: done.sent[k].detach().clone() if k in done.sent else before[k] - after[k] for k in before}
    if fault == "malformed":
        after = {k: torch.full_like(v, math.nan) for k, v in after.items()}
        delta = {k: torch.full_like(v, math.nan) for k, v in delta.items()}
    num = settings.batch_size if settings.local_epochs == 0 else n
    # the originals as the client's images show them (augmentation's flips and shifts), for scoring: not the client's
    # work, so outside its timed round
    original = (stack.shown(done.original, done.inputs, paired=True) if done.original.shape == done.inputs.shape
                else done.original)
    return LocalResult(after, delta, int(num), done.steps, done.loss, done.inputs, original, done.labels,
                       done.seconds, done.sent_bytes)


def check_before_start(settings: FederationSettings, split: DataSplit) -> None:
    """Before anything starts, what every round would do: the clients' model builds and runs on the data
    (:func:`make_model`); the threat's server can do to it what it does (a malicious server's weights, on a copy,
    for round 1; the transform it ships, on two test samples); and a client takes one step on ``batch_size``
    training samples through its own defenses, in its mode. Else the one-line error of the first that fails (DP-SGD
    on a model with BatchNorm, say), instead of a failed client in every round."""
    threat = get_threat(settings.threat)
    shipped = threat.transform(settings, split)
    model = make_model(settings, split)
    if threat.tamper is not None:
        threat.tamper(copy_model(model), 1, settings, split)
    if shipped is not None:
        shipped(copy_model(model), split.test_x[:2], split.test_y[:2])
    stack = client_side(settings.stack).bind(data_range=split.value_range, num_classes=split.num_classes,
                                             normalization=split.normalization)
    batch = (split.train_x[: settings.batch_size], split.train_y[: settings.batch_size])
    with torch.random.fork_rng(devices=[]), client_mode(model, settings.client_mode):
        defended_local_round(model, [batch], stack, lr=settings.lr, generator=torch.Generator().manual_seed(0),
                             loss=settings.loss, optimizer=settings.local_optimizer)


def federation_accounting(settings: FederationSettings) -> Accounting:
    """What a privacy accountant needs to know of this federation's training, for the client that is easiest to
    single out: the smallest partition (its sampling rate is the highest), every round (all clients take part:
    ``client_rate`` 1), its local steps per round, and ``delta = min(1e-5, 1 / training samples)``."""
    split = data_split(settings.data, settings.test_size, settings.public_size)
    parts = _partition((), settings.data, settings.test_size, settings.public_size, settings.clients,
                       settings.partition, settings.seed, settings.alpha, settings.batch_size)
    smallest = min(len(p) for p in parts)
    batch = min(settings.batch_size, smallest)
    steps = settings.local_steps if settings.local_epochs == 0 else settings.local_epochs * max(1, smallest // batch)
    return Accounting(rounds=settings.rounds, local_steps=steps, batch_size=batch, dataset_size=smallest,
                      client_rate=CLIENT_RATE, delta=min(1e-5, 1.0 / len(split.train_y)))
