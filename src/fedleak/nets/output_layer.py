"""The layer whose output a model returns (its logits): the parameters the label inference reads.

Found in the traced ``forward`` by walking back from its output, through whatever follows the layer (a sigmoid, a
scaling, a ``log_softmax``), to the nearest ``nn.Linear`` module or ``F.linear`` call whose weight is a parameter
of the model (``F.linear(h, self.w2, self.b2)``: a model that holds its weights as parameters and applies them
through functions). A product with a parameter on the way (``h @ self.W.T``) is a layer too, whose weight no
name says: none is found then, rather than the layer before it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx, nn
from torch.nn import functional as F

from fedleak.errors import FedleakError, ModelError
from fedleak.loose_parameters import loose_parameters
from fedleak.nets.graph_reads import PRODUCTS, layer_weight, op_key, parameter_read, viewed_parameter
from fedleak.nets.tracing import PerStructure, shared_trace


@dataclass(frozen=True)
class OutputLayer:
    """The ``named_parameters()`` names of the output layer's weight (classes x features) and bias (None without
    one)."""

    weight: str
    bias: str | None


_FOUND: PerStructure[OutputLayer | None] = PerStructure()  # what output_layer found, per model structure


def output_layer(model: nn.Module) -> OutputLayer | None:
    """The layer whose output ``model`` returns; None where the forward does not trace or no Linear layer (module,
    or ``F.linear`` of parameters) leads to the output (:func:`traced_without_one` tells the two apart)."""
    return _FOUND.get(model, None, lambda: _traced(model))


def _traced(model: nn.Module) -> OutputLayer | None:
    try:
        gm = shared_trace(model)
    except ModelError:
        return None
    modules = dict(gm.named_modules())
    parameters = dict(model.named_parameters())
    queue = [n for n in gm.graph.nodes if n.op == "output"]
    seen: set[fx.Node] = set()
    while queue:
        node = queue.pop(0)
        if found := _layer(node, modules, parameters):
            return found
        if op_key(node) in PRODUCTS and any(viewed_parameter(a, parameters) for a in node.all_input_nodes):
            return None
        inputs: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), inputs.append)
        for n in inputs:
            if n not in seen:
                seen.add(n)
                queue.append(n)
    return None


def _layer(node: fx.Node, modules: dict[str, nn.Module], parameters: dict[str, nn.Parameter]) -> OutputLayer | None:
    """The parameters of ``node`` where it is a Linear layer: an ``nn.Linear`` module, or ``F.linear`` whose weight
    (and bias, if any) are parameters the graph reads (``get_attr``)."""
    if node.op == "call_module" and isinstance(layer := modules.get(str(node.target)), nn.Linear):
        prefix = f"{node.target}." if node.target else ""
        return OutputLayer(f"{prefix}weight", f"{prefix}bias" if layer.bias is not None else None)
    if node.op != "call_function" or node.target is not F.linear:
        return None
    name = parameter_read(layer_weight(node), parameters)
    if name is None or parameters[name].dim() != 2:
        return None
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if bias is None:
        return OutputLayer(name, None)
    bias_name = parameter_read(bias, parameters)
    return OutputLayer(name, bias_name) if bias_name is not None else None


def traced_without_one(model: nn.Module) -> bool:
    """Whether ``model``'s forward traces and no Linear layer leads to its output (:func:`output_layer` is None for
    it), as opposed to a forward that does not trace."""
    if output_layer(model) is not None:
        return False
    try:
        shared_trace(model)
    except ModelError:
        return False
    return True


def output_layer_names(model: nn.Module) -> tuple[str, str | None]:
    """Names of the output layer's weight and bias (``None`` without a bias): the Linear layer the traced forward
    returns the output of (:func:`output_layer`), or, for a forward that does not trace, the last ``nn.Linear``
    registered; :class:`~fedleak.errors.FedleakError` where there is none."""
    if (found := output_layer(model)) is not None:
        return found.weight, found.bias
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    if not linears or traced_without_one(model):
        raise FedleakError(loose_parameters(model) or "label inference needs a model whose logits are a Linear "
                           "layer's output (an nn.Linear, or F.linear of its parameters)")
    name = list(linears)[-1]
    prefix = f"{name}." if name else ""
    return f"{prefix}weight", (f"{prefix}bias" if linears[name].bias is not None else None)
