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

from fedleak.errors import FedleakError
from fedleak.federation.hooks import get_defense, get_threat
from fedleak.federation.partition import partition_indices
from fedleak.federation.settings import FederationSettings, data_split, parse_fault


@dataclass(frozen=True)
class LocalResult:
    """A client's new weights plus what it reports (``num_examples``) and, for evaluation only, the
    samples it trained on (``inputs`` after any transform, ``original`` before it)."""

    weights: dict[str, torch.Tensor]
    delta: dict[str, torch.Tensor]  # before - after, accumulated exactly (lr * gradient per step)
    num_examples: int
    steps: int
    loss: float
    inputs: torch.Tensor
    original: torch.Tensor
    labels: torch.Tensor


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


def local_update(model: nn.Module, settings: FederationSettings, partition_id: int, server_round: int) -> LocalResult:
    """Train ``model`` (the weights the server sent, changed in place) on the client's partition.

    One step per batch of ``batch_size``: the server-shipped transform (threat) and the client's own
    defense transform run on each batch first; the defense's post-processing runs on the final delta.
    """
    fault = _fault(settings, partition_id, server_round)
    if fault == "fail":
        raise RuntimeError(f"injected failure of partition {partition_id} in round {server_round}")
    x_all, y_all = client_partition(settings, partition_id)
    gen = np.random.default_rng([settings.seed, server_round, partition_id])
    n = len(x_all)
    if settings.local_epochs > 0:
        order = np.concatenate([gen.permutation(n) for _ in range(settings.local_epochs)])
        batches = [order[i : i + settings.batch_size] for i in range(0, len(order), settings.batch_size)]
        batches = [b for b in batches if len(b) == settings.batch_size] or batches[:1]
    else:
        if settings.batch_size > n:
            raise FedleakError(f"partition {partition_id} holds {n} samples, fewer than the batch size {settings.batch_size}")
        batches = [gen.choice(n, size=settings.batch_size, replace=False) for _ in range(settings.local_steps)]
    threat_tf = get_threat(settings.threat).transform(settings)
    defense = get_defense(settings.defense)
    defense_tf = defense.transform(settings)
    post = defense.postprocess(settings)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=settings.lr)
    used_x, used_orig, used_y, losses = [], [], [], []
    params = dict(model.named_parameters())
    acc = {k: torch.zeros_like(v) for k, v in before.items()}
    for b in batches:
        x, y = x_all[torch.from_numpy(np.asarray(b))], y_all[torch.from_numpy(np.asarray(b))]
        orig = x
        for tf in (threat_tf, defense_tf):
            if tf is not None:
                x, y = tf(model, x, y)
        if x.shape[0] != orig.shape[0]:
            orig = x  # a re-composed batch: no per-sample original
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        with torch.no_grad():  # plain SGD: the step is exactly lr * grad
            for name, p in params.items():
                if p.grad is not None:
                    acc[name] += settings.lr * p.grad
        opt.step()
        used_x.append(x.detach())
        used_orig.append(orig.detach())
        used_y.append(y.detach())
        losses.append(float(loss.detach()))
    after = {k: v.detach().clone() for k, v in model.state_dict().items()}
    delta = acc
    if post is not None:
        g = torch.Generator().manual_seed(int(gen.integers(2**62)))
        delta = post(delta, g)
        after = {k: before[k] - delta[k] for k in before}
    if fault == "malformed":
        after = {k: torch.full_like(v, math.nan) for k, v in after.items()}
        delta = {k: torch.full_like(v, math.nan) for k, v in delta.items()}
    num = settings.batch_size if settings.local_epochs == 0 else n
    return LocalResult(after, delta, int(num), len(batches), float(np.mean(losses)), torch.cat(used_x), torch.cat(used_orig),
                       torch.cat(used_y))
