"""Read the user's model as written: trace any ``nn.Module`` with ``torch.fx`` into a :class:`Network`.

The model is traced symbolically (modules and their functional twins alike), run once on a probe batch to
learn every node's shape (its buffers restored afterwards, so eval-mode statistics never move), and each
node is handed to the converter registered for it (:mod:`fedleak.nets.converters`). The model must be a
chain: every op reads the output of the op before it; a node that joins two branches (a residual add) is
refused by name.
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from collections.abc import Sequence

import torch
from torch import fx, nn

from fedleak.errors import ModelError
from fedleak.nets.graph_reads import op_key, parameter_read
from fedleak.nets.input_shapes import first_layer, held_first_layer, layer_input_shape, probe, untraced_input_shape
from fedleak.nets.layers import Conv, Dense
from fedleak.nets.network import Network, Step, assemble
from fedleak.nets.ops import CONVERTERS, EXACT_SCOPE, Op, ParameterRead, unsupported
from fedleak.nets.token_inputs import TokenInputs, token_reader
from fedleak.nets.tracing import PerStructure, shared_trace, trace_model, traced_shape
from fedleak.validation import check_module, check_shape

CACHED_SHAPES = 4  # networks kept per model (one per input shape asked for)
_INPUT_SHAPES: PerStructure[tuple[tuple[int, ...], tuple[str, ...]]] = PerStructure()  # what input_shape_of found


# arithmetic with constants, which a normalisation inside forward does to the input: ``(x - mean) / std``
INPUT_ARITHMETIC = frozenset({
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub, operator.imul,
    operator.itruediv, torch.add, torch.sub, torch.mul, torch.div,
    *(("method", m) for m in ("add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_")),
})


def _what(node: fx.Node, module: nn.Module | None) -> str:
    if module is not None:
        return type(module).__name__
    if node.op == "call_method":
        return f".{node.target}()"
    fn = node.target
    mod = getattr(fn, "__module__", None) or ""
    prefix = {"torch.nn.functional": "F.", "torch": "torch.", "_operator": "operator."}.get(
        mod, f"{mod}." if mod else "")
    return f"{prefix}{getattr(fn, '__name__', str(fn))}"


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n))
    return [n for n in found if n.op != "get_attr" and n.meta.get("shape") is not None]


def converter_key(node: fx.Node, module: nn.Module | None) -> object:
    """The key the converter of ``node`` is registered by (``module``: the module it calls, None for a function or
    method): the module's class or a base of it, else the function or ``("method", name)``; None where none is."""
    keys = [op_key(node)] if module is None else list(type(module).__mro__)
    return next((k for k in keys if k in CONVERTERS), None)


def _shape(node: fx.Node) -> tuple[int, ...]:
    return node.meta["shape"][1:]


def _read(model: nn.Module, parameters: dict[str, nn.Parameter]):
    """An argument of a call as a converter sees it: a parameter of ``model`` read as it is (a ``get_attr`` node) as
    a :class:`~fedleak.nets.ops.ParameterRead` held by ``model``'s own module (not the graph's: its weights stay
    live), anything else as it is."""

    def read(arg: fx.Node) -> object:
        if (name := parameter_read(arg, parameters)) is None:
            return arg
        prefix, _, attr = name.rpartition(".")
        return ParameterRead(name, model.get_submodule(prefix), attr)

    return lambda value: fx.node.map_arg(value, read)


def _steps(gm: fx.GraphModule, model: nn.Module) -> list[Step]:
    parameters = dict(model.named_parameters())
    read = _read(model, parameters)
    modules = dict(gm.named_modules())
    nodes = [n for n in gm.graph.nodes]
    placeholders = [n for n in nodes if n.op == "placeholder"]  # one: trace_model sees to it
    # ops that compute tensors; shape queries (x.size(0), x.shape[0]) only feed the arguments of a reshape
    ops = [n for n in nodes
           if n.op in ("call_module", "call_function", "call_method") and n.meta.get("shape") is not None]
    output = next(n for n in nodes if n.op == "output")
    calls = Counter(n.target for n in ops
                    if n.op == "call_module" and next(modules[n.target].parameters(), None) is not None)
    shared = next((t for t, c in calls.items() if c > 1), None)
    if shared is not None:
        raise ModelError(f"module '{shared}' ({type(modules[shared]).__name__}) is called {calls[shared]} times in "
                         "forward (shared weights): a client's gradient for its weights is the sum over its calls, "
                         f"which no layer-by-layer reading separates; {EXACT_SCOPE}")
    steps: list[Step] = []
    previous = placeholders[0]
    for k, node in enumerate(ops):
        module = modules[node.target] if node.op == "call_module" else None
        inputs = _tensor_inputs(node)
        weights = [n for a in node.all_input_nodes if (n := parameter_read(a, parameters))]
        if not inputs and weights:
            raise ModelError(f"node '{node.name}' ({_what(node, module)}) computes a tensor from the parameter "
                             f"'{weights[0]}' (a transpose, a scaling, a slice of a weight), which the update holds "
                             "the gradient of, not the computed one's: pass the parameter to F.linear as it is, or "
                             f"hold the weight in an nn.Linear layer; {EXACT_SCOPE}")
        if len(inputs) > 1:
            raise ModelError(f"node '{node.name}' ({_what(node, module)}) joins {len(inputs)} branches (a residual or "
                             f"skip connection); {EXACT_SCOPE}")
        if inputs != [previous]:
            raise ModelError(f"node '{node.name}' ({_what(node, module)}) does not read the output of the op before "
                             f"it, so the model is not a chain of layers; {EXACT_SCOPE}")
        op = Op(node=node.target if module is not None else node.name, what=_what(node, module),
                target=node.target if module is not None else "", module=module,
                args=tuple(read(tuple(node.args[1:]))), kwargs=dict(read(dict(node.kwargs))),
                in_shape=_shape(previous), out_shape=_shape(node), in_dtype=previous.meta.get("dtype"),
                out_dtype=node.meta.get("dtype"), last=k == len(ops) - 1)
        key = converter_key(node, module)
        if key is None:
            if not any(isinstance(st.layer, (Dense, Conv)) for st in steps) and op_key(node) in INPUT_ARITHMETIC:
                raise op.refuse("arithmetic on the model's input (a normalisation inside forward?) is not read "
                                "here (the exact and first-layer attacks, exclusivity analysis, the plan, fishing and "
                                "exclusivity reduction read it; a malicious server's first layer does not): normalise "
                                "the data instead (fedleak.Dataset.normalized(mean, std) keeps the map to score in "
                                f"pixels) and pass the model without it; {EXACT_SCOPE}")
            if op_key(node) in INPUT_ARITHMETIC:
                learned = weights and parameters[weights[0]].requires_grad
                what = (f"by the trainable parameter '{weights[0]}' (a learned temperature or scale), which the exact "
                        "methods do not read: they read" if learned else "here: the exact methods read only")
                raise op.refuse(f"arithmetic on a layer's output {what} a constant scale or shift (a number, a buffer, "
                                "a frozen parameter; a shift where the layer has a bias) directly on an nn.Linear "
                                f"layer's output, folded into that layer (logits / temperature); {EXACT_SCOPE}")
            raise unsupported(op)
        layer = CONVERTERS.get(key)(op)
        if layer is not None:
            steps.append(Step(layer, op.in_shape, op.out_shape))
        previous = node
    if _tensor_inputs(output) != [previous]:
        raise ModelError("the model's forward must return the output of its last op (one tensor of logits)")
    read_twice = next((n for n, c in Counter(n for st in steps if isinstance(st.layer, Dense)
                                             for n in st.layer.parameter_names()).items() if c > 1), None)
    if read_twice is not None:
        raise ModelError(f"parameter '{read_twice}' is read by more than one layer in forward (shared weights): a "
                         "client's gradient for it is the sum over its uses, which no layer-by-layer reading "
                         f"separates; {EXACT_SCOPE}")
    return steps


def input_shape_of(model: nn.Module, *, input_shape: Sequence[int] | None = None,
                   inputs: torch.Tensor | None = None) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """The shape of one input of ``model`` and what was assumed to get it (see :func:`as_network`).

    Works for any model that runs (also those the exact methods refuse, e.g. LeNet with sigmoids, or a forward
    that branches on its input's values, whose shape is then found by running it), so the optimisation attacks
    share it.
    """
    model = check_module(model)
    asked = asked_shape(input_shape, inputs)

    def resolve() -> tuple[tuple[int, ...], tuple[str, ...]]:
        try:
            gm = shared_trace(model, asked)
        except ModelError:  # a forward that does not trace: its input shape is read by running it
            gm = None
        return _resolved_shape(model, gm, input_shape, inputs)[:2]

    return _INPUT_SHAPES.get(model, asked, resolve)


def asked_shape(input_shape: Sequence[int] | None, inputs: torch.Tensor | None) -> tuple[int, ...] | None:
    """The input shape the caller gives, as ``input_shape`` or as a batch of ``inputs``; None where neither does."""
    if input_shape is not None:
        return check_shape("input_shape", input_shape)
    if isinstance(inputs, torch.Tensor) and inputs.dim() >= 2:
        return tuple(int(s) for s in inputs.shape[1:])
    return None


def _resolved_shape(model: nn.Module, gm: fx.GraphModule | None, input_shape: Sequence[int] | None,
                    inputs: torch.Tensor | None) -> tuple[tuple[int, ...], tuple[str, ...], tuple[str, ...]]:
    """The input shape, what was assumed to get it and how that may keep the exact methods from certifying
    (``gm`` None: a forward that does not trace, read by running the model)."""
    notes: tuple[str, ...] = ()
    caveats: tuple[str, ...] = ()
    tokens = token_reader(first_layer(gm) if gm is not None else held_first_layer(model))
    if tokens:
        raise TokenInputs(tokens)
    asked = asked_shape(input_shape, inputs)
    if asked is not None:
        shape = asked
    elif getattr(model, "input_shape", None) is not None:
        shape = check_shape("input_shape", model.input_shape)
    elif gm is None:
        return untraced_input_shape(model)
    else:
        shape, notes, caveats = layer_input_shape(model, first_layer(gm))
    why = probe(model, gm, shape)
    # a model that flattens nothing itself takes the same values as flat rows; its inputs keep their shape
    if why is not None and (len(shape) == 1 or probe(model, gm, (math.prod(shape),)) is not None):
        raise ModelError(f"the model does not run on inputs of shape {shape} ({why}); pass the right input_shape=")
    return shape, notes, caveats


# what tracing found, per model and input shape asked for: it costs a few milliseconds, which matters for small
# models. Only the structure is kept (typed steps holding the live modules, shapes, notes); every call assembles a
# fresh Network, so nothing computed from the weights (unrolled conv maps) outlives a change of the weights.
_TRACED: PerStructure[tuple[list[Step], tuple[int, ...], tuple[str, ...], tuple[str, ...]]] = PerStructure(
    most=CACHED_SHAPES)


def as_network(model: nn.Module, *, input_shape: Sequence[int] | None = None,
               inputs: torch.Tensor | None = None) -> Network:
    """Read ``model`` (any ``nn.Module`` whose forward is a chain of supported ops) into a :class:`Network`.

    The input shape is ``input_shape`` when given, else that of ``inputs`` (a batch), else
    ``model.input_shape`` (fedleak's builders set it), else derived from the layer shapes: the first Linear
    layer's ``in_features`` for an MLP (flat inputs), a square image that fits for a CNN (the size that the most
    halvings divide where several fit: :func:`~fedleak.nets.input_shapes.most_halved`; stated in
    :attr:`Network.notes`). Raises :class:`ModelError` naming the node that does not fit. A model read before,
    whose structure is unchanged since (same modules, modes and tensor shapes) is not traced again.
    """
    model = check_module(model)
    asked = (None if input_shape is None else tuple(input_shape),
             None if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2 else tuple(inputs.shape[1:]))

    def read() -> tuple[list[Step], tuple[int, ...], tuple[str, ...], tuple[str, ...]]:
        gm = trace_model(model, asked_shape(input_shape, inputs))
        shape, notes, caveats = _resolved_shape(model, gm, input_shape, inputs)
        if (fixed := traced_shape(gm)) is not None:
            notes = (*notes, f"the forward computes with its input's shape (x.size()[1:], x.dim(), ...): read for "
                             f"inputs of shape {fixed}, any batch size")
        return _steps(gm, model), shape, notes, caveats

    steps, shape, notes, caveats = _TRACED.get(model, asked, read)
    return assemble(list(steps), shape, notes, caveats)
