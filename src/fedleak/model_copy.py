"""One copy of a user's model, whatever it holds: ``copy.deepcopy`` refuses a module whose attributes hold tensors
computed with autograd (the older ``torch.nn.utils.weight_norm`` keeps its last ``weight`` so, until the next forward
recomputes it); those are copied detached. :func:`state_copy` copies a model's state as a FedAvg reply carries it."""

from __future__ import annotations

import copy
from typing import TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


def copy_model(model: M) -> M:
    """A deep copy of ``model``; a tensor attribute that autograd computed (not a leaf) is copied detached."""
    memo: dict[int, object] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of ``model``'s whole state, detached: its weights and buffers (BatchNorm's statistics), as a FedAvg
    client's reply carries them."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
