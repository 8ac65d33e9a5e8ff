"""A FedAvg client: E local optimisation steps on its own data, then it uploads its new weights.

The server receives a :class:`~fedleak.updates.WeightUpdate`. What a real client reveals is its new
weights and its number of examples; the learning rate, the optimizer and its state stay private, and
the number of local steps is recorded only when ``reveal_local_steps=True`` (a threat model that grants
the server this knowledge, e.g. because it prescribes the local schedule).

Local training never touches the caller's model: it runs on a deep copy. Mini-batches are drawn
reproducibly from ``seed``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from fedleak.autograd_mode import with_autograd
from fedleak.client_loss import check_class_weights, check_label_smoothing, client_loss, ends_in_sigmoid
from fedleak.errors import DataError, FedleakError
from fedleak.focal import check_focal_gamma
from fedleak.model_copy import copy_model, state_copy
from fedleak.transforms import BatchTransform
from fedleak.updates import WeightUpdate, check_client_batch, forward_logits
from fedleak.validation import MAX_COUNT, check_float, check_int, check_labels, check_module, check_seed


def _sgd(params, lr: float, momentum: float, weight_decay: float, **_):
    return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)


def _momentum(params, lr: float, momentum: float, weight_decay: float, **_):
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _adam(params, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, **_):
    return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


#: the local optimizers a simulated client can use (name -> torch optimizer factory)
LOCAL_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": _sgd,
    "momentum": _momentum,
    "adam": _adam,
}


def _batches(n: int, batch_size: int | None, steps: int, shuffle: bool, gen: torch.Generator) -> list[torch.Tensor]:
    """Indices of the mini-batch of every local step: epochs of a (shuffled) partition of range(n)."""
    if batch_size is None or batch_size >= n:
        return [torch.arange(n)] * steps
    out: list[torch.Tensor] = []
    while len(out) < steps:
        order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
        out.extend(order[i : i + batch_size] for i in range(0, n, batch_size))
    return out[:steps]


@with_autograd
def local_training(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    lr: float,
    local_steps: int = 1,
    optimizer: str = "sgd",
    batch_size: int | None = None,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    shuffle: bool = True,
    seed: int = 0,
    label_smoothing: float = 0.0,
    class_weights: Sequence[float] | None = None,
    focal_gamma: float = 0.0,
    transform: BatchTransform | None = None,
) -> nn.Module:
    """Train a copy of ``model`` for ``local_steps`` steps of its mean loss (cross-entropy; binary cross-entropy
    for a model with one logit) and return the copy.

    ``batch_size=None`` uses the whole local data set at every step (E full-batch steps); otherwise
    each step takes the next mini-batch of a per-epoch shuffled partition (seeded by ``seed``).
    ``weight_decay``: the optimizer's (torch's ``weight_decay``: ``lr * weight_decay * w`` more per step).
    ``label_smoothing``, ``class_weights``: the cross-entropy's, as ``F.cross_entropy`` takes them
    (``label_smoothing``, ``weight``); ``focal_gamma``: a focal loss's exponent instead (:mod:`fedleak.focal`).
    ``transform``: code the client runs on every mini-batch before its step (a
    batch defense such as ``make_defense("augmentation")``, which draws anew at each step, or a transform a server
    shipped); its randomness comes from torch's generator, seeded from ``seed`` and the step (the caller's is left
    as it was).
    """
    model = check_client_batch(model, inputs, labels)
    if optimizer not in LOCAL_OPTIMIZERS:
        raise FedleakError(f"unknown local optimizer '{optimizer}'; available: {', '.join(LOCAL_OPTIMIZERS)}")
    if check_float("the learning rate lr", lr) <= 0:
        raise FedleakError(f"the learning rate must be positive and finite, got {lr}")
    steps = check_int("local_steps", local_steps, low=1, high=MAX_COUNT)
    if batch_size is not None:
        check_int("batch_size", batch_size, low=1)
    check_float("momentum", momentum, low=0.0)
    check_float("weight_decay", weight_decay, low=0.0)
    smoothing = check_label_smoothing(label_smoothing)
    weights = check_class_weights(class_weights, label_smoothing=smoothing)
    gamma = check_focal_gamma(focal_gamma, label_smoothing=smoothing, class_weights=weights)
    client = copy_model(model)
    client.train()
    params = [p for p in client.parameters() if p.requires_grad]
    if not params:
        raise FedleakError("the model has no trainable parameters")
    dtype = params[0].dtype
    opt = LOCAL_OPTIMIZERS[optimizer](params, lr=float(lr), momentum=float(momentum), weight_decay=float(weight_decay))
    gen = torch.Generator().manual_seed(check_seed("seed", seed))
    x = inputs.to(dtype)
    for step, idx in enumerate(_batches(x.shape[0], batch_size, steps, shuffle, gen)):
        xb, yb = x[idx], labels[idx]
        if transform is not None:  # seeded per step: the same seed draws the same transforms
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seed) * 1_000_003 + step)
                xb, yb = transform(client, xb, yb)
        opt.zero_grad(set_to_none=True)
        logits = forward_logits(client, xb, yb)
        if step == 0:  # every label, not only this mini-batch's, must be one of the model's classes
            check_labels(labels, max(int(logits.shape[1]), 2), error=DataError)
            probability = ends_in_sigmoid(client, logits)
        loss = client_loss(logits, yb, probability=probability, label_smoothing=smoothing,
                           class_weights=weights, focal_gamma=gamma)
        loss.backward()
        opt.step()
    return client


def fedavg_update(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    lr: float,
    local_steps: int = 1,
    optimizer: str = "sgd",
    batch_size: int | None = None,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    shuffle: bool = True,
    seed: int = 0,
    reveal_local_steps: bool = False,
    label_smoothing: float = 0.0,
    class_weights: Sequence[float] | None = None,
    focal_gamma: float = 0.0,
    reveal_learning_rate: bool = False,
    transform: BatchTransform | None = None,
) -> WeightUpdate:
    """The FedAvg update of a client holding ``(inputs, labels)``: weights before and after local training.

    The update carries ``num_examples`` (clients report it for weighted averaging) and, only when
    ``reveal_local_steps`` is set, ``local_steps``; only when ``reveal_learning_rate`` is set (a server that sets its
    clients' rate knows it), ``learning_rate``. The optimizer and weight decay are not revealed.
    ``label_smoothing``, ``class_weights``: the cross-entropy's; ``focal_gamma``: a focal loss's; ``transform``:
    what the client runs on every mini-batch (:func:`local_training`).
    """
    model = check_module(model)  # the model inside a wrapper (DataParallel, torch.compile): its names
    trained = local_training(
        model, inputs, labels, lr=lr, local_steps=local_steps, optimizer=optimizer, batch_size=batch_size,
        momentum=momentum, weight_decay=weight_decay, shuffle=shuffle, seed=seed, label_smoothing=label_smoothing,
        class_weights=class_weights, focal_gamma=focal_gamma, transform=transform,
    )
    before = state_copy(model)
    after = state_copy(trained)
    return WeightUpdate(
        before=before,
        after=after,
        num_examples=int(inputs.shape[0]),
        local_steps=int(local_steps) if reveal_local_steps else None,
        learning_rate=lr if reveal_learning_rate else None,
    )
