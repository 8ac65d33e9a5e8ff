"""What a node of a traced model's ``torch.fx`` graph reads: the key its op is known by, the weight a functional
layer call reads, and whether that is one of the model's parameters, as it is or through a view."""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

from fedleak.nets.layer_calls import LAYER_CALLS

# products that mix features: one with a parameter is a layer whose weight no name gives (``x @ self.W.T``)
PRODUCTS = frozenset({operator.matmul, torch.matmul, torch.mm, torch.einsum, ("method", "matmul"), ("method", "mm")})
# views of a tensor: ``self.W.T``, ``W.t()``, a reshape
VIEWS = frozenset({getattr, torch.t, torch.transpose, ("method", "t"), ("method", "transpose"),
                   ("method", "permute"), ("method", "view"), ("method", "reshape")})


def op_key(node: fx.Node) -> object:
    """What a converter is registered by for a function or method node: the function, or ``("method", name)``."""
    return ("method", node.target) if node.op == "call_method" else node.target


def layer_weight(node: fx.Node) -> object | None:
    """The weight argument of a functional layer call (``F.linear``, ``F.conv2d``, ...); None for another node."""
    if node.op != "call_function" or node.target not in LAYER_CALLS:
        return None
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")


def parameter_read(arg: object, parameters: dict[str, nn.Parameter]) -> str | None:
    """The name of the parameter ``arg`` reads as it is (a ``get_attr`` node of one of ``parameters``), else None."""
    if isinstance(arg, fx.Node) and arg.op == "get_attr" and str(arg.target) in parameters:
        return str(arg.target)
    return None


def viewed_parameter(node: fx.Node, parameters: dict[str, nn.Parameter]) -> str | None:
    """The name of the parameter ``node`` is, or is a view of through a chain of views; None where it is none."""
    while op_key(node) in VIEWS and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return parameter_read(node, parameters)
