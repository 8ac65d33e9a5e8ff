"""A model Opacus wraps for DP-SGD (``PrivacyEngine.make_private`` returns a ``GradSampleModule``), as fedleak reads
it: a copy of the module inside, without the hooks Opacus registered on it.

Opacus's hooks stay on the wrapped module's layers: they store every training-mode forward's inputs on the layers
and per-sample gradients on the parameters, and they fail on a copy of a parameter that Opacus did not mark. The
copy computes the same function with the same weights and leaves the client's model as it was.
"""

from __future__ import annotations

import copy
import sys

from torch import nn

_LAYER_STATE = ("activations", "autograd_grad_sample_hooks")  # what Opacus sets on the layers it hooks


def opacus_inner(model: nn.Module) -> nn.Module | None:
    """A hook-free copy of the module an Opacus grad-sample wrapper holds; None where ``model`` is none (Opacus
    not imported: it cannot be one)."""
    base = sys.modules.get("opacus.grad_sample.gsm_base")
    if base is None or not isinstance(model, base.AbstractGradSampleModule):
        return None
    inner = model._module
    handles = getattr(model, "autograd_grad_sample_hooks", None) or []
    ids = {handle.id for handle in handles}
    memo: dict[int, object] = {id(model): model}
    for layer in inner.modules():  # leave Opacus's stored inputs and handles out of the copy
        memo.update({id(value): None for name, value in vars(layer).items() if name in _LAYER_STATE})
    clean = copy.deepcopy(inner, memo)
    for layer in clean.modules():
        for name in _LAYER_STATE:
            layer.__dict__.pop(name, None)
        for hooks in (layer._forward_hooks, layer._forward_hooks_with_kwargs, layer._forward_hooks_always_called,
                      layer._forward_pre_hooks, layer._backward_hooks, layer._backward_pre_hooks):
            for key in ids.intersection(hooks):
                del hooks[key]
    return clean
