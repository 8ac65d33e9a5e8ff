"""How a simulated client runs the model as it computes its update: in training mode (``model.train()``), as
training loops do, so that Dropout drops units and BatchNorm normalises by each batch's statistics; or in eval
mode. The exact methods model the eval-mode network, so from clients in training mode they certify nothing for a
model with Dropout or BatchNorm (:func:`fedleak.nets.network.training_mode_cause`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from fedleak.errors import OptionError
from fedleak.forward_failure import BATCH_NORMS, ONE_INPUT_REMEDY, forward_failure
from fedleak.nets.buffers import buffers_kept

CLIENT_MODES = ("train", "eval")


def check_client_mode(mode: object) -> str:
    """``mode`` if it is one of :data:`CLIENT_MODES`, else :class:`OptionError` saying which are."""
    if mode not in CLIENT_MODES:
        raise OptionError(f"client_mode must be train or eval, got {mode!r}")
    return str(mode)


@contextmanager
def client_mode(model: nn.Module, mode: str) -> Iterator[nn.Module]:
    """``model`` in the client's ``mode`` for the block; after it, every module back in the mode it was in (a model
    trained with some of its layers kept in eval mode, a frozen BatchNorm say, keeps them so)."""
    modes = [(module, module.training) for module in model.modules()]
    model.train(check_client_mode(mode) == "train")
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def one_sample_refusal(model: nn.Module, inputs: torch.Tensor) -> str:
    """Why a client in training mode cannot compute a batch of one of ``inputs`` (a BatchNorm layer then sees one
    value per channel, which torch refuses), or ``""`` where it can. Runs one forward pass of ``model`` only when it
    has a BatchNorm layer, and leaves its running statistics and modes as they were."""
    if not any(isinstance(m, BATCH_NORMS) for m in model.modules()):
        return ""
    one = inputs[:1]
    with client_mode(model, "train"), buffers_kept(model), torch.no_grad(), torch.random.fork_rng(devices=[]):
        try:
            model(one)
        except (RuntimeError, ValueError) as exc:
            return forward_failure(model, one, exc, remedy=ONE_INPUT_REMEDY)
    return ""
