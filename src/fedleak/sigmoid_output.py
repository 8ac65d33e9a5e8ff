"""Binary classifiers whose forward ends with a sigmoid, trained with ``BCELoss`` on the probability it gives.

The gradient of ``BCELoss(sigmoid(z), y)`` at the logit ``z`` is ``sigmoid(z) - y``, that of
``BCEWithLogitsLoss(z, y)``: such a model is read as the same model without its final sigmoid
(:mod:`fedleak.binary`), and its simulated clients train it as it is written, with ``BCELoss`` on its output.
"""

from __future__ import annotations

import torch
from torch import fx, nn
from torch.nn import functional as F

from fedleak.errors import ModelError
from fedleak.nets.tracing import trace_model

SIGMOIDS = (torch.sigmoid, F.sigmoid)


def logit_model(model: nn.Module) -> fx.GraphModule | None:
    """``model`` traced, its forward returning the input of its final sigmoid (its logit), or None when its
    forward does not end with a sigmoid (or cannot be traced). The graph module shares ``model``'s layers (nothing
    is copied; ``model`` itself is unchanged): copy it before changing them."""
    try:
        gm = trace_model(model)
    except ModelError:  # an untraceable model is read as it is
        return None
    out = next(n for n in gm.graph.nodes if n.op == "output")
    last = out.args[0]
    if not isinstance(last, fx.Node) or not _is_sigmoid(gm, last):
        return None
    out.args = (last.args[0],)
    gm.graph.erase_node(last)
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm


def _is_sigmoid(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), nn.Sigmoid)
    return (node.op == "call_function" and node.target in SIGMOIDS) or (
        node.op == "call_method" and node.target == "sigmoid")
