"""The federation an evaluation shares across its cells: the clients' data and partitions, the test set and the model
(:func:`prepare_federation`), and the clients' local batches (:func:`local_batches`)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from fedleak.data import Dataset, load_dataset
from fedleak.data.holdout import held_out_size, split_order
from fedleak.defenses.stack import DefenseStack
from fedleak.errors import DataError
from fedleak.evaluation.settings import CLIENT_SIZE, TEST_SIZE, EvaluationSettings


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


def bind_defenses(stack: DefenseStack, fed: Federation) -> DefenseStack:
    """``stack`` bound to the federation's data: its range, classes and normalisation."""
    return stack.bind(data_range=fed.train.value_range, num_classes=fed.train.num_classes,
                      normalization=fed.train.normalization)


def local_batches(data: Dataset, part: np.ndarray, size: int, steps: int, rng: np.random.Generator
                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` batches of ``size`` samples of a client's ``part``: distinct within a batch, and across the batches
    while the part holds enough (as an epoch's batches are), else drawn afresh for each."""
    if size * steps <= len(part):
        chosen = np.split(part[rng.choice(len(part), size=size * steps, replace=False)], steps)
    else:
        chosen = [part[rng.choice(len(part), size=size, replace=False)] for _ in range(steps)]
    return [(data.x[idx], data.y[idx]) for idx in (torch.from_numpy(c) for c in chosen)]
