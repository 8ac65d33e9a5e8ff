"""Binary classifiers whose forward ends with a sigmoid, trained with ``BCELoss`` on the probability it gives, or
squeezes its one logit per sample to a vector (``self.fc(h).squeeze(1)``, as ``BCEWithLogitsLoss`` on float labels
takes it).

The gradient of ``BCELoss(sigmoid(z), y)`` at the logit ``z`` is ``sigmoid(z) - y``, that of
``BCEWithLogitsLoss(z, y)``: such a model is read as the same model without its final sigmoid, and without the
reshapes of its logit, returning the output layer's N x 1 (:mod:`fedleak.binary`); its simulated clients train it
as it is written, with ``BCELoss`` on its output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.nn import functional as F

from fedleak.errors import ModelError
from fedleak.nets.graph_reads import op_key
from fedleak.nets.tracing import trace_model

SIGMOIDS = (torch.sigmoid, F.sigmoid)
#: the reshapes by which a forward turns its N x 1 logit into N values (or back), keyed as fx nodes are (op_key)
RESHAPES = frozenset({torch.squeeze, torch.flatten, torch.reshape, ("method", "squeeze"), ("method", "flatten"),
                      ("method", "view"), ("method", "reshape")})


@dataclass(frozen=True)
class LogitModel:
    """A single-logit model traced, its forward returning the logit as its output layer gives it (``module``), and
    whether a final sigmoid was taken off (``sigmoid``: the client's loss is ``BCELoss`` on the probability)."""

    module: fx.GraphModule
    sigmoid: bool


def logit_model(model: nn.Module) -> LogitModel | None:
    """``model`` (a single-logit one) traced, its forward returning the input of its final sigmoid and of the
    reshapes of the logit after the output layer, or None when its forward ends with neither (or cannot be traced).
    The graph module shares ``model``'s layers (nothing is copied; ``model`` itself is unchanged): copy it before
    changing them."""
    try:
        gm = trace_model(model)
    except ModelError:  # an untraceable model is read as it is
        return None
    out = next(n for n in gm.graph.nodes if n.op == "output")
    last, sigmoid, peeled = out.args[0], False, False
    while isinstance(last, fx.Node) and (_is_sigmoid(gm, last) or _is_reshape(last)):
        sigmoid |= _is_sigmoid(gm, last)
        last, peeled = last.args[0], True
    if not peeled:
        return None
    out.args = (last,)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return LogitModel(gm, sigmoid)


def _is_reshape(node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method") and op_key(node) in RESHAPES


def _is_sigmoid(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), nn.Sigmoid)
    return (node.op == "call_function" and node.target in SIGMOIDS) or (
        node.op == "call_method" and node.target == "sigmoid")
