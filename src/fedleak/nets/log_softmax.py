"""``torch.log(F.softmax(z, dim=1))`` read as the ``F.log_softmax(z, dim=1)`` it computes.

Models written for ``NLLLoss`` end with the log of their probabilities, and not all of them write ``log_softmax``:
``torch.log(F.softmax(x, dim=1))``, ``F.softmax(x, 1).log()``, ``nn.Softmax(dim=1)`` then ``torch.log``. The two
compute the same values and the same gradient (the client's float32 arithmetic differs by its rounding, as any two
kernels'), so every reader of a traced model (:func:`fedleak.nets.tracing.trace_model`) sees the one op, which the
exact methods read as they read ``log_softmax``. A softmax without its dimension, one another node reads too, or a
log of anything more (``torch.log(p + 1e-8)``: another loss) is left as it is, and refused where it is read.
"""

from __future__ import annotations

import torch
from torch import fx, nn
from torch.nn import functional as F

from fedleak.nets.graph_reads import op_key

SOFTMAX = frozenset({F.softmax, torch.softmax, ("method", "softmax")})
LOG = frozenset({torch.log, ("method", "log")})


def _softmax_dim(node: fx.Node, gm: fx.GraphModule) -> int | None:
    """The dimension ``node`` takes a softmax over, where it is one given explicitly; else None."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        return module.dim if isinstance(module, nn.Softmax) and module.dim is not None else None
    if node.op not in ("call_function", "call_method") or op_key(node) not in SOFTMAX:
        return None
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    return dim if isinstance(dim, int) else None


def fuse_log_softmax(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with each log of a softmax (that nothing else reads) replaced by one ``F.log_softmax`` node, in
    place; recompiled where anything changed."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op not in ("call_function", "call_method") or op_key(node) not in LOG:
            continue
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            continue
        soft = node.args[0]
        dim = _softmax_dim(soft, gm)
        if dim is None or len(soft.users) != 1 or not isinstance(soft.args[0], fx.Node):
            continue
        with gm.graph.inserting_before(node):
            fused = gm.graph.call_function(F.log_softmax, (soft.args[0],), {"dim": dim})
        fused.meta = dict(node.meta)
        node.replace_all_uses_with(fused)
        gm.graph.erase_node(node)
        gm.graph.erase_node(soft)
        changed = True
    if changed:
        gm.recompile()
    return gm
