"""``len(x)`` in a model's forward, read while tracing it as the batch-size query it is.

``torch.fx`` refuses ``len`` of a traced tensor (``x.view(len(x), -1)``), although it only reads the batch size,
as ``x.size(0)`` does. While fedleak traces a model, :func:`len_recorded` makes ``len`` record such a call as a node
of the graph (a shape query, like ``x.size(0)``) and otherwise be the builtin, for the forward of the model and
every function it calls, as ``torch.fx`` itself patches ``nn.Module.__call__`` while it traces; ``len`` is the
builtin again afterwards.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import fx

_BUILTIN_LEN = builtins.len


def _len(obj: Any) -> Any:
    """``len`` that records itself on a traced value, else the builtin."""
    if isinstance(obj, fx.Proxy):
        return obj.tracer.create_proxy("call_function", _BUILTIN_LEN, (obj,), {})
    return _BUILTIN_LEN(obj)


@contextmanager
def len_recorded() -> Iterator[None]:
    """While tracing: ``len`` of a traced value is recorded (callers hold the tracing lock)."""
    builtins.len = _len
    try:
        yield
    finally:
        builtins.len = _BUILTIN_LEN
