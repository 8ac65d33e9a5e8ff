"""Parameters a model's forward never reads (a layer it defines but does not call), found in its traced graph.

No gradient reaches them (torch leaves their ``.grad`` at None), as none reaches a frozen parameter, so a client's
update for them is absent, None, or zeros.
"""

from __future__ import annotations

from torch import nn

from fedleak.errors import ModelError
from fedleak.nets.tracing import shared_trace


def unused_parameters(model: nn.Module) -> frozenset[str]:
    """The names (as ``model.named_parameters()`` gives them) of the trainable parameters ``model``'s forward never
    reads: no module holding them is called and no op reads them. Empty where the forward does not trace."""
    try:
        gm = shared_trace(model)
    except ModelError:
        return frozenset()
    read: set[int] = set()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            read.update(id(p) for p in gm.get_submodule(node.target).parameters())
        elif node.op == "get_attr":
            found = _attribute(gm, str(node.target))
            if isinstance(found, nn.Module):
                read.update(id(p) for p in found.parameters())
            elif found is not None:
                read.add(id(found))
    return frozenset(name for name, p in model.named_parameters() if p.requires_grad and id(p) not in read)


def _attribute(root: nn.Module, target: str) -> object:
    found: object = root
    for part in target.split("."):
        found = getattr(found, part, None)
    return found
