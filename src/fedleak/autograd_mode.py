"""Autograd on for a computation that needs it, whatever mode its caller is in.

Users often run their evaluation code inside ``torch.no_grad()`` or ``torch.inference_mode()``. A client's
gradient, its local training and the attacks that optimise or recompute a gradient need autograd: the public
functions that compute one run under :func:`with_autograd`, which turns it on for them and copies the inference
tensors among their arguments (data made inside ``torch.inference_mode()``) into ordinary ones, which autograd
can save for its backward pass; the steps inside that differentiate run under :func:`autograd_on`
(``torch.enable_grad()`` alone leaves inference mode on).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

import torch

P = ParamSpec("P")
R = TypeVar("R")


@contextmanager
def autograd_on() -> Iterator[None]:
    """A block with autograd on: outside inference mode, gradients enabled (the caller's modes restored after)."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def with_autograd(fn: Callable[P, R]) -> Callable[P, R]:
    """``fn``, run with autograd on (outside inference mode, gradients enabled) and its inference-tensor
    arguments copied into ordinary tensors."""

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        with autograd_on():
            return fn(*(ordinary(a) for a in args), **{k: ordinary(v) for k, v in kwargs.items()})

    return run


def ordinary(value):
    """``value``, or an ordinary copy of it where it is an inference tensor."""
    return value.clone() if isinstance(value, torch.Tensor) and value.is_inference() else value
