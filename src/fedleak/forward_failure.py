"""Why a user's model refused a batch, in one line: what the client simulators and the attacks' searches say when
the model's own forward raises."""

from __future__ import annotations

import torch
from torch import nn

#: layers whose training-mode forward reads the batch's statistics (and so cannot run one input of a dense layer)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
#: what a client that computes a batch of one through BatchNorm in training mode can do instead
ONE_INPUT_REMEDY = "use batches of 2 or more, or run the model (its clients) in eval mode"
#: layers that read token indices
EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)


def in_training_mode_with_batch_norm(model: nn.Module) -> bool:
    """Whether ``model`` holds a BatchNorm layer in training mode."""
    return any(isinstance(m, BATCH_NORMS) and m.training for m in model.modules())


def forward_failure(model: nn.Module, inputs: torch.Tensor, exc: Exception, remedy: str = "") -> str:
    """Why ``model(inputs)`` raised ``exc``: torch's first line, and where a batch of one went through BatchNorm in
    training mode, that this is the cause (and ``remedy``, what the caller's user can do about it)."""
    first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    msg = f"the model cannot take inputs of shape {tuple(inputs.shape)}: {first}"
    if inputs.shape[0] == 1 and in_training_mode_with_batch_norm(model):
        msg += "; a BatchNorm layer in training mode needs at least 2 inputs per batch"
        msg += f": {remedy}" if remedy else ""
    if any(isinstance(m, EMBEDDINGS) for m in model.modules()):
        msg += ("; if the model reads token indices (an embedding), fedleak cannot rebuild them: it rebuilds "
                "continuous inputs (images, signals, records)")
    return msg
