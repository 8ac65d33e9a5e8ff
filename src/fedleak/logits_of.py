"""Models whose forward returns more than the logits (``return logits, features``; a dict; a model-output object).

fedleak reads a model's logits: every attack recomputes the client's loss on them. Where ``forward`` returns several
values, :class:`NotLogits` says so at once (no input shape or option changes it), and :class:`LogitsOf` is the
model that returns the one the client's loss reads: the same modules, parameters and buffers under the same names,
so updates keyed like the model's ``named_parameters()`` fit it as they are.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from fedleak.errors import ModelError, OptionError
from fedleak.validation import check_module


class NotLogits(ModelError):
    """The model's forward returns something other than one tensor (no input shape changes that)."""


def _what(out: Any) -> str:
    if isinstance(out, (tuple, list)):
        kinds = ", ".join(type(v).__name__ if not isinstance(v, torch.Tensor) else "tensor" for v in out)
        return f"a {type(out).__name__} of {len(out)} ({kinds})"
    if isinstance(out, dict):
        return f"a dict with keys {sorted(map(str, out))}"
    return f"a {type(out).__name__}"


def logits_only(out: Any) -> torch.Tensor:
    """``out`` (what a model's forward returned) if it is a tensor; else the :class:`NotLogits` that says what it
    is and what to pass instead."""
    if isinstance(out, torch.Tensor):
        return out
    which = "0" if isinstance(out, (tuple, list)) and not hasattr(out, "_fields") else "'logits'"
    raise NotLogits(f"the model's forward returns {_what(out)}, not one tensor of logits: pass "
                    f"fedleak.LogitsOf(model, {which}) with the position or key of the logits the client's loss reads "
                    f"(for --model file.py:NAME, a function NAME in the file that returns it)")


def per_sample_logits(out: Any, samples: int) -> torch.Tensor:
    """:func:`logits_only` of what a model returned for a batch of ``samples``, with the one logit per sample of a
    binary classifier that squeezes it (``self.fc(h).squeeze(1)``, what ``BCEWithLogitsLoss`` on float labels takes)
    as a column, the ``samples x 1`` of one that does not; any other shape as it is, for the caller to refuse."""
    logits = logits_only(out)
    return logits[:, None] if logits.ndim == 1 and logits.shape[0] == samples else logits


class LogitsOf(nn.Module):
    """``model``, returning only ``which`` of what its forward returns: a position (tuple, list) or a key (dict) or
    attribute name (an output object's ``.logits``, a named tuple's field).

    The same computation under the same names: ``model``'s own submodules, parameters and buffers are this
    module's (shared, not copied), and ``model``'s forward runs with this module as ``self``, so updates and state
    dicts keyed like ``model.named_parameters()`` fit, ``torch.fx`` traces through it, and ``.eval()`` reaches
    every layer. Attributes ``model`` keeps outside its modules (a device, a class count) are read from it.
    """

    def __init__(self, model: nn.Module, which: int | str = 0):
        model = check_module(model)  # the model inside DataParallel or torch.compile
        if isinstance(which, bool) or not isinstance(which, (int, str)):
            raise OptionError(f"which must be the position (an int) or key (a str) of the logits in what the "
                              f"model returns, got {which!r}")
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, param in model.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buf in model.named_buffers(recurse=False):
            self.register_buffer(name, buf, persistent=name not in model._non_persistent_buffers_set)
        self.__dict__["wrapped"] = model  # held, not registered: the names stay the model's
        self.which = which
        self.training = model.training  # the flag only: .train() would set the shared modules' too

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = type(self.wrapped).forward(self, x)
        try:
            return out[self.which]
        except (IndexError, KeyError, TypeError):
            pass
        if isinstance(self.which, str) and hasattr(out, self.which):  # an output object (.logits), a named tuple
            return getattr(out, self.which)
        raise ModelError(f"LogitsOf: the model's forward returns {_what(out)}, which has no {self.which!r}")

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self.__dict__.get("wrapped")
            if model is None:
                raise
        found = inspect.getattr_static(type(model), name, None)
        if hasattr(found, "__get__") and not isinstance(found, (nn.Module, torch.Tensor)):
            return found.__get__(self, type(self))  # a method or property of the model's class, on this module
        return getattr(model, name)

    def extra_repr(self) -> str:
        return f"{type(self.wrapped).__name__}, which={self.which!r}"
