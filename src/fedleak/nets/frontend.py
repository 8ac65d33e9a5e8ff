"""Read the user's model as written: trace any ``nn.Module`` with ``torch.fx`` into a :class:`Network`.

The model is traced symbolically (modules and their functional twins alike), run once on a probe batch to
learn every node's shape (its buffers restored afterwards, so eval-mode statistics never move), and each
node is handed to the converter registered for it (:mod:`fedleak.nets.converters`). The model must be a
chain: every op reads the output of the op before it; a node that joins two branches (a residual add) is
refused by name.
"""

from __future__ import annotations

import contextlib
import io
import math
import operator
import time
import weakref
from collections import Counter
from collections.abc import Sequence

import torch
from torch import fx, nn

from fedleak.errors import ModelError
from fedleak.logits_of import logits_only
from fedleak.loose_parameters import loose_parameters
from fedleak.nets.buffers import buffers_kept
from fedleak.nets.layers import Conv, Dense
from fedleak.nets.network import Network, Step, assemble
from fedleak.nets.ops import CONVERTERS, EXACT_SCOPE, Op, unsupported
from fedleak.nets.token_inputs import TokenInputs, token_reader
from fedleak.nets.tracing import trace_model
from fedleak.validation import check_module, check_shape

CACHED_SHAPES = 4  # networks kept per model (one per input shape asked for)
PROBE_BATCH = 2  # the probe batch has two samples, so an op that mixes samples shows in its shapes
MAX_SIDE = 512  # the largest square image side tried when the input shape must be inferred
MAX_ALSO_FITS = 64  # how many larger sides are tried after the smallest that fits


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph and records every tensor node's shape and dtype in ``node.meta["shape"]``, ``["dtype"]``."""

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        tensor = isinstance(result, torch.Tensor)
        n.meta["shape"] = tuple(int(s) for s in result.shape) if tensor else None
        n.meta["dtype"] = result.dtype if tensor else None
        return result


def _probe(model: nn.Module, gm: fx.GraphModule | None, shape: tuple[int, ...]) -> str | None:
    """Run a probe batch of ``shape``, recording every node's shape (through ``gm``; with ``gm`` None, a plain
    forward that records nothing, for a quick yes or no); why the model cannot take it, or None."""
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    x = torch.zeros(PROBE_BATCH, *shape, dtype=dtype, device=_device(model))
    # a traced model (torch.fx's GraphModule, as a federation's audit template is) prints its generated code to
    # stderr when it fails: a wrong shape tried here is an answer, not an error to show
    with buffers_kept(model), torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
        try:
            out = model(x) if gm is None else _ShapeRecorder(gm).run(x)
        except Exception as err:  # a wrong shape fails anywhere in the user's forward
            return (str(err).strip().splitlines() or [type(err).__name__])[0]
    out = logits_only(out)
    if out.dim() != 2 or out.shape[0] != PROBE_BATCH:
        return f"for a batch of {PROBE_BATCH} it returns {tuple(out.shape)}, not {PROBE_BATCH} x classes logits"
    return None


def output_linear(model: nn.Module) -> str | None:
    """The name of the ``nn.Linear`` layer whose output the model returns (its logits), read back from the output
    of the traced forward through whatever follows it (a sigmoid, a scaling); None where the forward does not
    trace or no Linear layer leads to the output."""
    try:
        gm = trace_model(model)
    except ModelError:
        return None
    modules = dict(gm.named_modules())
    queue = [n for n in gm.graph.nodes if n.op == "output"]
    seen: set[fx.Node] = set()
    while queue:
        node = queue.pop(0)
        if node.op == "call_module" and isinstance(modules.get(node.target), nn.Linear):
            return str(node.target)
        found: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), found.append)
        for n in found:
            if n not in seen:
                seen.add(n)
                queue.append(n)
    return None


def _first_layer(gm: fx.GraphModule) -> tuple[str, nn.Module] | None:
    """The first module the traced forward calls that holds weights of its own (its name and the module)."""
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op == "call_module" and next(modules[node.target].parameters(recurse=False), None) is not None:
            return node.target, modules[node.target]
    return None


# where the input's last dimensions are not fixed by the first layer: the most of each tried (signals, images,
# volumes), a side at a time, when the input shape must be inferred
MAX_SIDES = {1: 4096, 2: MAX_SIDE, 3: 64}
INFER_SECONDS = 10.0  # ... for at most this long (a forward that fails slowly, e.g. in an unflatten, costs ms)
KINDS = {1: ("signals", "sample{} long", "length", "L"), 2: ("square images", "pixel{} a side", "size", "H, W"),
         3: ("cubic volumes", "voxel{} a side", "size", "D, H, W")}


def _input_shape(model: nn.Module, gm: fx.GraphModule) -> tuple[tuple[int, ...], tuple[str, ...], tuple[str, ...]]:
    """The input shape from the first layer with weights when nothing gives it, the assumption made to get it, and
    (where larger inputs fit the layers too, as when pooling or a stride rounds down) how that assumption may
    keep the exact methods from certifying anything. A Linear (or a first LayerNorm or BatchNorm1d) layer gives
    it; a convolution gives its channels, and the smallest signal, square image or cube that fits the layers
    after it gives the rest."""
    first = _first_layer(gm)
    if first is None:
        raise ModelError(loose_parameters(model)
                         or "the model has no layer with weights; pass input_shape= (the shape of one input)")
    name, layer = first
    if isinstance(layer, nn.Linear):
        return (layer.in_features,), (), ()
    if isinstance(layer, nn.LayerNorm):
        return tuple(int(s) for s in layer.normalized_shape), (), ()
    if isinstance(layer, nn.BatchNorm1d):
        return (layer.num_features,), (), ()
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return _conv_input_shape(model, layer.in_channels, len(layer.kernel_size))
    raise ModelError(f"the model's first layer with weights, '{name}' ({type(layer).__name__}), does not say the "
                     "shape of the model's input (a Linear or a convolution does); pass input_shape= (the shape of "
                     "one input)")


def _conv_input_shape(model: nn.Module, c: int, dims: int) -> tuple[tuple[int, ...], tuple[str, ...],
                                                                    tuple[str, ...]]:
    """``(c, side, ...)`` of the smallest side (``dims`` of them) that fits the model, and the notes; with one
    channel, ``(side, ...)`` where only that fits (a model that adds the channel axis itself, ``x.unsqueeze(1)``)."""
    kind, units, size, sides = KINDS[dims]
    most = MAX_SIDES[dims]

    def unit(n: int) -> str:
        return units.format("" if n == 1 else "s")

    def shape(side: int) -> tuple[int, ...]:
        return (*lead, *(side,) * dims)

    # plain forwards: a failing fx run is slow (seconds, the first time)
    tried = ((lead, side) for side in range(1, most + 1) for lead in ((c,), ()) if lead or c == 1)
    deadline = time.monotonic() + INFER_SECONDS
    for lead, side in tried:
        if time.monotonic() > deadline:
            raise ModelError(f"no {kind.removesuffix('s')} of {c} channel(s) up to {side - 1} {unit(side - 1)} fits "
                             f"the model, and trying more takes too long; pass input_shape=({c}, {sides})")
        if _probe(model, None, shape(side)) is None:
            top = side  # the sizes that fit are consecutive: a larger input gives larger maps, until none fits
            while top < min(side + MAX_ALSO_FITS, most) and _probe(model, None, shape(top + 1)) is None:
                top += 1
            if top == side + MAX_ALSO_FITS:  # no layer fixes the size (adaptive or global pooling)
                raise ModelError(f"the model takes {kind} of any {size} from {side} {unit(side)} up (no layer "
                                 f"fixes the {size}: adaptive or global pooling), so their {size} cannot be "
                                 f"inferred; pass input_shape=({', '.join([*map(str, lead), sides])}) or the inputs")
            also = "" if top == side else f" ({side} to {top} {unit(top)} fit)"
            note = (f"input shape {shape(side)} inferred from the layer shapes, assuming {kind} of the smallest "
                    f"{size} that fits{also}; pass input_shape= (or inputs) if yours differ")
            caveats = () if top == side else (
                f"your inputs are not the {shape(side)} inferred for the model: {kind} of {side} to {top} {unit(top)} "
                "fit its layers (pass input_shape=)",)
            return shape(side), (note,), caveats
    raise ModelError(f"no {kind.removesuffix('s')} of {c} channel(s) up to {most} {unit(most)} fits the model; pass "
                     f"input_shape=({c}, {sides})")


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


def op_key(node: fx.Node) -> object:
    """What a converter is registered by for a function or method node: the function, or ``("method", name)``."""
    return ("method", node.target) if node.op == "call_method" else node.target


def converter_key(node: fx.Node, module: nn.Module | None) -> object:
    """The key the converter of ``node`` is registered by (``module``: the module it calls, None for a function or
    method): the module's class or a base of it, else the function or ``("method", name)``; None where none is."""
    keys = [op_key(node)] if module is None else list(type(module).__mro__)
    return next((k for k in keys if k in CONVERTERS), None)


def _shape(node: fx.Node) -> tuple[int, ...]:
    return node.meta["shape"][1:]


def _steps(gm: fx.GraphModule) -> list[Step]:
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
        if len(inputs) > 1:
            raise ModelError(f"node '{node.name}' ({_what(node, module)}) joins {len(inputs)} branches (a residual or "
                             f"skip connection); {EXACT_SCOPE}")
        if inputs != [previous]:
            raise ModelError(f"node '{node.name}' ({_what(node, module)}) does not read the output of the op before "
                             f"it, so the model is not a chain of layers; {EXACT_SCOPE}")
        op = Op(node=node.target if module is not None else node.name, what=_what(node, module),
                target=node.target if module is not None else "", module=module,
                args=tuple(node.args[1:]), kwargs=dict(node.kwargs), in_shape=_shape(previous),
                out_shape=_shape(node), in_dtype=previous.meta.get("dtype"), out_dtype=node.meta.get("dtype"),
                last=k == len(ops) - 1)
        key = converter_key(node, module)
        if key is None:
            if not any(isinstance(st.layer, (Dense, Conv)) for st in steps) and op_key(node) in INPUT_ARITHMETIC:
                raise op.refuse("arithmetic on the model's input (a normalisation inside forward?) is not read "
                                "here (the exact and first-layer attacks, exclusivity analysis, the plan, fishing and "
                                "exclusivity reduction read it; a malicious server's first layer does not): normalise "
                                "the data instead (fedleak.Dataset.normalized(mean, std) keeps the map to score in "
                                f"pixels) and pass the model without it; {EXACT_SCOPE}")
            raise unsupported(op)
        layer = CONVERTERS.get(key)(op)
        if layer is not None:
            steps.append(Step(layer, op.in_shape, op.out_shape))
        previous = node
    if _tensor_inputs(output) != [previous]:
        raise ModelError("the model's forward must return the output of its last op (one tensor of logits)")
    return steps


def input_shape_of(model: nn.Module, *, input_shape: Sequence[int] | None = None,
                   inputs: torch.Tensor | None = None) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """The shape of one input of ``model`` and what was assumed to get it (see :func:`as_network`).

    Works for any traceable model (also those the exact methods refuse, e.g. LeNet with sigmoids), so the
    optimisation attacks share it.
    """
    model = check_module(model)
    shape, notes, _ = _resolved_shape(model, trace_model(model), input_shape, inputs)
    return shape, notes


def _resolved_shape(model: nn.Module, gm: fx.GraphModule, input_shape: Sequence[int] | None,
                    inputs: torch.Tensor | None) -> tuple[tuple[int, ...], tuple[str, ...], tuple[str, ...]]:
    """The input shape, what was assumed to get it and how that may keep the exact methods from certifying."""
    notes: tuple[str, ...] = ()
    caveats: tuple[str, ...] = ()
    tokens = token_reader(_first_layer(gm))
    if tokens:
        raise TokenInputs(tokens)
    if input_shape is not None:
        shape = check_shape("input_shape", input_shape)
    elif inputs is not None and isinstance(inputs, torch.Tensor) and inputs.dim() >= 2:
        shape = tuple(int(s) for s in inputs.shape[1:])
    elif getattr(model, "input_shape", None) is not None:
        shape = check_shape("input_shape", model.input_shape)
    else:
        shape, notes, caveats = _input_shape(model, gm)
    why = _probe(model, gm, shape)
    # a model that flattens nothing itself takes the same values as flat rows; its inputs keep their shape
    if why is not None and (len(shape) == 1 or _probe(model, gm, (math.prod(shape),)) is not None):
        raise ModelError(f"the model does not run on inputs of shape {shape} ({why}); pass the right input_shape=")
    return shape, notes, caveats


# what tracing found, per model: it costs a few milliseconds, which matters for small models. Only the
# structure is kept (typed steps holding the live modules, shapes, notes); every call assembles a fresh
# Network, so nothing computed from the weights (unrolled conv maps) outlives a change of the weights.
_TRACED: weakref.WeakKeyDictionary[nn.Module, dict[tuple, tuple[list[Step], tuple[int, ...], tuple[str, ...]]]] = (
    weakref.WeakKeyDictionary())


def model_structure(model: nn.Module) -> tuple:
    """What tracing depends on: the modules (identity, type, mode) and every tensor's shape, dtype and device."""
    mods = tuple((name, id(m), type(m), m.training) for name, m in model.named_modules())
    tensors = tuple((name, tuple(t.shape), t.dtype, t.device)
                    for name, t in (*model.named_parameters(), *model.named_buffers()))
    return mods, tensors, getattr(model, "input_shape", None)


def as_network(model: nn.Module, *, input_shape: Sequence[int] | None = None,
               inputs: torch.Tensor | None = None) -> Network:
    """Read ``model`` (any ``nn.Module`` whose forward is a chain of supported ops) into a :class:`Network`.

    The input shape is ``input_shape`` when given, else that of ``inputs`` (a batch), else
    ``model.input_shape`` (fedleak's builders set it), else derived from the layer shapes: the first Linear
    layer's ``in_features`` for an MLP (flat inputs), the smallest square image that fits for a CNN (stated in
    :attr:`Network.notes`). Raises :class:`ModelError` naming the node that does not fit. A model read before,
    whose structure is unchanged since (same modules, modes and tensor shapes) is not traced again.
    """
    model = check_module(model)
    asked = (None if input_shape is None else tuple(input_shape),
             None if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2 else tuple(inputs.shape[1:]))
    key = (asked, model_structure(model))
    known = {k: v for k, v in _TRACED.get(model, {}).items() if k[1] == key[1]}  # another structure: forget
    if key not in known:
        if loose := loose_parameters(model):
            raise ModelError(f"{loose}; {EXACT_SCOPE}")
        gm = trace_model(model)
        shape, notes, caveats = _resolved_shape(model, gm, input_shape, inputs)
        if len(known) >= CACHED_SHAPES:
            known.pop(next(iter(known)))
        known[key] = (_steps(gm), shape, notes, caveats)
    _TRACED[model] = known
    steps, shape, notes, caveats = known[key]
    return assemble(list(steps), shape, notes, caveats)
