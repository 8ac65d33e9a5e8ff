"""One round of a defended client: local steps through a :class:`~fedleak.defenses.DefenseStack`.

Each step runs the server-shipped transform (a threat such as fishing, if any), then the client's batch
defenses, then computes the gradient (the stack's step defense, e.g. DP-SGD, or plain autograd) and takes the
step ``p -= lr * d``: ``d`` is the gradient, or the direction of the client's optimizer
(:mod:`~fedleak.clients.local_optimizers`: torch's SGD with momentum and weight decay, as Flower's quickstart
clients train, or Adam). After the last step the client's update filters run on the accumulated change ``before -
after`` (exactly ``lr`` times the sum of the step directions), and the model is set to ``before - sent``: what the
server receives. The federation's clients and :func:`fedleak.evaluate` both train this way.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from fedleak.client_loss import PLAIN_LOSS, ClientLoss
from fedleak.clients.local_optimizers import PLAIN_SGD, LocalOptimizer
from fedleak.defenses.base import ClientBatch
from fedleak.defenses.stack import DefenseStack
from fedleak.errors import FedleakError
from fedleak.model_copy import copy_model
from fedleak.nets.buffers import buffers_kept
from fedleak.transforms import BatchTransform
from fedleak.updates import batch_loss, trainable_parameters


@dataclass(frozen=True)
class LocalRound:
    """What a defended client did in one round.

    ``sent`` is the change it transmits (``before - after`` after its update filters), keyed like the model's
    trainable parameters; ``inputs`` / ``original`` / ``labels`` are the samples it trained on after / before
    its transforms (concatenated over steps; ``original`` equals ``inputs`` where a transform re-composed the
    batch); ``seconds`` the client's compute time, ``sent_bytes`` the size of what it transmits.
    """

    sent: dict[str, torch.Tensor]
    inputs: torch.Tensor
    original: torch.Tensor
    labels: torch.Tensor
    steps: int
    loss: float
    seconds: float
    sent_bytes: int


def defended_local_round(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    stack: DefenseStack,
    *,
    lr: float,
    generator: torch.Generator,
    shipped: BatchTransform | None = None,
    loss: ClientLoss = PLAIN_LOSS,
    optimizer: LocalOptimizer = PLAIN_SGD,
) -> LocalRound:
    """Train ``model`` in place on ``batches`` (steps at ``lr`` in the ``optimizer``'s directions, plain SGD by default,
    on the client's ``loss``, the plain cross-entropy by default) as a client running ``stack``; on return the model
    holds ``before - sent``.
    Batches a defense withholds entirely are skipped; if every batch is withheld a FedleakError says so (the client
    has nothing to send)."""
    start = time.perf_counter()
    params = trainable_parameters(model)
    before = {n: p.detach().clone() for n, p in params.items()}
    snapshot = copy_model(model) if any(f.needs_batch for f in stack.filters) else None
    acc = {n: torch.zeros_like(p) for n, p in before.items()}
    states: dict[str, object] = dict.fromkeys(before)  # the optimizer's state per parameter
    used_x, used_orig, used_y, losses = [], [], [], []
    for x, y in batches:
        orig = x
        if shipped is not None:
            x, y = shipped(model, x, y)
        x, y = stack.transform(model, x, y)
        if x.shape[0] == 0:
            continue
        grads = stack.gradient(model, x, y, generator, loss)
        with torch.no_grad(), buffers_kept(model):  # the loss reported, by a forward that leaves BatchNorm's stats
            losses.append(float(batch_loss(model, x, y, **loss.options())))
            for name, p in params.items():
                direction, states[name] = optimizer.direction(grads[name].to(p.dtype), p, states[name])
                step = lr * direction
                p -= step
                acc[name] += step
        used_x.append(x.detach())
        used_orig.append((orig if orig.shape[0] == x.shape[0] else x).detach())
        used_y.append(y.detach())
    if not used_x:
        raise FedleakError(f"the client's defenses ({stack.label}) withheld every batch: it has nothing to send")
    inputs, labels = torch.cat(used_x), torch.cat(_same_kind(used_y))
    batch = ClientBatch(snapshot, inputs, labels) if snapshot is not None else None
    sent = stack.filter(acc, batch, generator)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(before[name] - sent[name].to(p.dtype))
    return LocalRound(sent, inputs, torch.cat(used_orig), labels, len(used_x), float(sum(losses) / len(losses)),
                      time.perf_counter() - start, stack.sent_bytes(sent))


def _same_kind(labels: list[torch.Tensor]) -> list[torch.Tensor]:
    """Steps' labels made concatenable: soft everywhere if any step sent soft labels."""
    if all(y.ndim == 1 for y in labels):
        return labels
    k = max(int(y.shape[1]) for y in labels if y.ndim == 2)
    return [y if y.ndim == 2 else nn.functional.one_hot(y.long(), k).float() for y in labels]
