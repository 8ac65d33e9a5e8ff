"""Whether a layer reads the model's input as it is: what the traced forward does to the sample before the layer.

The first-layer attack reads a layer's input off its gradient. That input is the client's sample only where nothing
before the layer could have given two samples the same input there: a reshape, a cast that keeps the values'
dtype (read off a probe run: ``x.half()`` rounds), ``nn.Identity`` or a Dropout (whose training-mode masking is
read apart: :mod:`fedleak.attacks.masked_input`). A clamp, a ReLU, an absolute value or a branch on the values
maps many samples to one, and a probe forward pass cannot tell: on values inside ``[0, 1]`` each of
``x.clamp(0, 1)``, ``F.relu(x)`` and ``x.abs()`` is the identity. So the path is read from the traced graph, op by
op, and a forward that does not trace (control flow on the values) shows nothing.
"""

from __future__ import annotations

from torch import fx, nn
from torch.nn import functional as F

from fedleak.errors import ModelError
from fedleak.nets.converters import cast, dropout, identity, reshape
from fedleak.nets.frontend import converter_key
from fedleak.nets.graph_reads import layer_weight
from fedleak.nets.input_shapes import probe
from fedleak.nets.ops import CONVERTERS
from fedleak.nets.tracing import PerStructure, shared_trace

# the converters of ops that pass every value of the sample on unchanged (a Dropout in eval mode)
AS_IS = frozenset({reshape, identity, cast, dropout})
_FOUND: PerStructure[str] = PerStructure()  # what was found, per model: it depends on its structure only


def changed_before(model: nn.Module, layer: str, shape: tuple[int, ...]) -> str:
    """Why the module ``layer`` of ``model`` (or ``F.linear`` of the parameter ``layer``) may not read the sample as
    it is, in words; empty where the traced forward shows it does (only reshapes, identities, casts and Dropout lie
    between the input and its first call). ``shape``: one input's (the shape a forward that computes with it is
    traced for)."""
    return _FOUND.get(model, (layer, tuple(shape)), lambda: _changed_before(model, layer, shape))


def _changed_before(model: nn.Module, layer: str, shape: tuple[int, ...]) -> str:
    try:
        gm = shared_trace(model, shape)
    except ModelError as err:
        return (f"what the forward does to the sample before '{layer}' is not known ({err}); a clamp, an absolute "
                "value or a branch on the values there would give other samples the same input to that layer")
    modules = dict(gm.named_modules())
    call = next((n for n in gm.graph.nodes if (n.op == "call_module" and n.target == layer) or _reads(n, layer)), None)
    if call is None or not call.args:
        return f"the traced forward does not call '{layer}' on the sample"
    path: list[fx.Node] = []  # the ops between the input and the layer, from the layer back
    node = call.args[0]
    while isinstance(node, fx.Node) and node.op != "placeholder":
        path.append(node)
        node = node.args[0] if node.args else None
    if not isinstance(node, fx.Node):
        return f"the input of '{layer}' is not computed from the sample alone"
    converters = []
    for node in path:
        module = modules.get(node.target) if node.op == "call_module" else None
        key = converter_key(node, module) if node.op in ("call_module", "call_function", "call_method") else None
        converters.append((node, module, None if key is None else CONVERTERS.get(key)))
    if any(c is cast for _, _, c in converters):  # a probe run records each node's dtype: a cast may round
        why = probe(model, gm, shape)
        if why is not None:
            return f"the model does not run on inputs of shape {shape} ({why})"
    for node, module, converter in reversed(converters):  # the first op from the input that may change the values
        kept = converter is not cast or node.meta.get("dtype") == node.args[0].meta.get("dtype")
        if converter not in AS_IS or not kept:
            what = type(module).__name__ if module is not None else getattr(node.target, "__name__", str(node.target))
            return (f"the forward computes '{node.name}' ({what}) from the sample before '{layer}' reads it, which "
                    "may give other samples the same input to that layer")
    return ""


def _reads(node: fx.Node, weight: str) -> bool:
    """Whether ``node`` is ``F.linear`` of the parameter named ``weight``, as it is."""
    arg = layer_weight(node)
    return node.target is F.linear and isinstance(arg, fx.Node) and arg.op == "get_attr" and arg.target == weight
