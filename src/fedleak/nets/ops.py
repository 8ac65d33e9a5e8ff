"""One step of a traced model as a converter sees it, and the converter registry.

A converter turns one :class:`Op` (a node of the ``torch.fx`` graph of the user's model: a module call, a
function such as ``F.relu`` or a tensor method such as ``x.view``) into a typed layer of
:mod:`fedleak.nets.layers`, or into ``None`` when the op is the identity for fedleak (eval-mode Dropout).
Converters are registered by the module class, the function object or the method name they handle; adding
a layer to fedleak means one converter (see :mod:`fedleak.nets.converters`) and its tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fedleak.errors import ModelError
from fedleak.nets.layers import Layer
from fedleak.registry import Registry

# what the exact methods need, for every refusal message
EXACT_SCOPE = (
    "fedleak's exact methods (exclusivity analysis, the exact attack, fishing, exclusivity reduction) need a chain "
    "of Linear, Conv2d or Conv1d (or F.linear, F.conv2d, F.conv1d of the model's parameters), eval-mode "
    "BatchNorm2d/1d, ReLU, max/avg "
    "pooling, flatten/view/reshape and eval-mode Dropout; "
    "'auto' and the optimisation attacks (dlg, idlg, ig, dlm, dlm+) need only autograd and still apply"
)


@dataclass(frozen=True, eq=False)
class ParameterRead:
    """A parameter of the model that an op reads as an argument, as it is (``F.linear(x, self.w1, self.b1)``: a
    ``get_attr`` node of the graph): its name in ``model.named_parameters()``, and the module that holds it
    (``owner``) with its attribute there (``attr``)."""

    name: str
    owner: nn.Module
    attr: str


@dataclass(frozen=True)
class Op:
    """A node of the traced model: ``what`` names the op for people (``Conv2d``, ``F.relu``, ``.view``).

    ``module`` is the called submodule (None for functions and methods) and ``target`` its qualified name in
    the model (``conv1``); ``args``/``kwargs`` are the call's arguments after the input tensor (a parameter of the
    model among them as a :class:`ParameterRead`); shapes (per sample) and dtypes are measured by running the model
    on a probe batch in its parameters' dtype.
    """

    node: str
    what: str
    target: str
    module: nn.Module | None
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    in_shape: tuple[int, ...] = ()
    out_shape: tuple[int, ...] = ()
    in_dtype: torch.dtype | None = None
    out_dtype: torch.dtype | None = None
    last: bool = False

    def refuse(self, reason: str) -> ModelError:
        """The error for an op fedleak's exact methods cannot model (one line, naming the node)."""
        return ModelError(f"node '{self.node}' ({self.what}): {reason}")

    def arg(self, position: int, name: str, default: Any = None) -> Any:
        """Argument ``name`` of the call, given by keyword or at ``position`` after the input tensor."""
        if name in self.kwargs:
            return self.kwargs[name]
        return self.args[position] if position < len(self.args) else default

    def parameter(self, attribute: str) -> str | None:
        """The ``named_parameters()`` name of the module's parameter ``attribute`` (None if it has none); refused
        where the module computes it from other parameters (:func:`computed_parameter`)."""
        if self.module is None or getattr(self.module, attribute, None) is None:
            return None
        if why := computed_parameter(self.module, attribute):
            raise self.refuse(f"{why}; {EXACT_SCOPE}")
        return f"{self.target}.{attribute}" if self.target else attribute


Converter = Callable[[Op], Layer | None]

# keys: a module class, a function object, or ("method", name) for tensor methods
CONVERTERS: Registry[Converter] = Registry("layer converter")


def converts(*keys: object) -> Callable[[Converter], Converter]:
    """Register the decorated converter for every key (module classes, functions, ``("method", name)``)."""

    def decorator(fn: Converter) -> Converter:
        for key in keys:
            CONVERTERS.register(key, fn)
        return fn

    return decorator


def unsupported(op: Op) -> ModelError:
    """The error for an op no converter handles."""
    return op.refuse(f"not supported; {EXACT_SCOPE}")


def computed_parameter(module: nn.Module, attribute: str) -> str:
    """Why ``module``'s ``attribute`` (its weight) is not a parameter of its own, in words: a parametrization
    (``spectral_norm``; weight normalisation is read as the plain layer, :mod:`fedleak.nets.weight_norm`) computes it
    from the ones a client's update holds the gradients of, which are not the weight's, or ``torch.nn.utils.prune``
    masks it; empty where it is a parameter."""
    value = getattr(module, attribute, None)
    if value is None or isinstance(value, nn.Parameter):
        return ""
    if isinstance(getattr(module, f"{attribute}_mask", None), torch.Tensor) and \
            isinstance(getattr(module, f"{attribute}_orig", None), nn.Parameter):  # torch.nn.utils.prune's hook
        return (f"it is pruned (torch.nn.utils.prune): its {attribute} is '{attribute}_orig' times the mask "
                f"'{attribute}_mask', so a client's update holds {attribute}_orig's gradient, zero wherever the mask "
                f"is, where the exact methods read the whole gradient of the {attribute}")
    own = [n for n, _ in module.named_parameters() if attribute in n]  # parametrizations.weight.original
    return (f"its {attribute} is computed from {', '.join(repr(n) for n in own) or 'other tensors'} (spectral_norm or "
            f"another parametrization than weight normalisation, which is read), so a client's update holds their "
            f"gradients, from which the {attribute}'s, which the exact methods read, cannot be rebuilt (remove it "
            "before training: torch.nn.utils.parametrize.remove_parametrizations)")
