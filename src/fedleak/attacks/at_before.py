"""The model at the weights a FedAvg client started from, which is where an attack on its weight update reads it."""

from __future__ import annotations

import torch
from torch import nn

from fedleak.model_copy import copy_model
from fedleak.updates import WeightUpdate


def model_at_before(model: nn.Module, update: WeightUpdate) -> nn.Module:
    """``model`` itself where its weights and buffers are the update's ``before`` (a server's own model at the
    round's global weights, as usual), else a copy of it set to them; the model passed is never changed."""
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    if all(torch.equal(state[n].detach(), v.to(device=state[n].device, dtype=state[n].dtype))
           for n, v in update.before.items()):
        return model
    at_before = copy_model(model)
    with torch.no_grad():
        for n, t in (*at_before.named_parameters(), *at_before.named_buffers()):
            if n in update.before:
                t.copy_(update.before[n].to(t.dtype))
    return at_before
