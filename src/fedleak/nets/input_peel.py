"""Arithmetic and changes of layout a model's forward does to its input before its first layer, read off and peeled.

:func:`peel_input_map` gives the exact methods the model without them (the same modules, shared, so its weights stay
live) and the :class:`~fedleak.nets.input_map.InputMap` they make: read from the model's live constants on probes
(0, 1, random values and, for a change of layout, the values 1..n, which say where each value goes), checked to be
an elementwise affine map of the reordered values that keeps each sample's values apart.
"""

from __future__ import annotations

import builtins
import itertools
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn

from fedleak.errors import ModelError
from fedleak.nets.buffers import buffers_kept
from fedleak.nets.converters import cast, identity, layout_change, reshape
from fedleak.nets.frontend import INPUT_ARITHMETIC, as_network, input_shape_of
from fedleak.nets.graph_reads import op_key
from fedleak.nets.input_map import InputMap
from fedleak.nets.ops import CONVERTERS
from fedleak.nets.tracing import PerStructure, keep_every_tensor, recorded_len, shared_trace, trace_model

F64 = torch.float64
AFFINE_TOL = 1e-9  # relative: the arithmetic must give a x + b on a random probe to this (it is elementwise affine)
# the ops whose input operand may only be the first one: c / x is not affine in x
FIRST_ONLY = frozenset({"truediv", "div", "div_", "itruediv"})


@dataclass(frozen=True, eq=False)
class _Peeled:
    """The model without its input arithmetic (``stripped``) and what reading the map needs: the traced
    ``graph``, its ``input`` node, the arithmetic ``nodes`` in order (and the reshapes and changes of layout among
    them)."""

    stripped: nn.Module
    graph: fx.Graph
    input: fx.Node
    nodes: tuple[fx.Node, ...]
    arithmetic: tuple[fx.Node, ...]
    layout: bool = False  # the nodes change the layout: the stripped model reads their output's shape


_PEELED: PerStructure[_Peeled | None] = PerStructure()


def peel_input_map(model: nn.Module, *, input_shape: Sequence[int] | None = None,
                   inputs: torch.Tensor | None = None) -> tuple[nn.Module, InputMap | None]:
    """``model`` without the arithmetic (and changes of layout) its forward does to its input before its first layer,
    and that as an :class:`InputMap` (read from the model's live constants, on inputs of the shape
    :func:`~fedleak.nets.as_network` finds with ``input_shape`` / ``inputs``; with a change of layout, of the model's
    own input shape, :func:`_layout_input_shape`); ``(model, None)`` where it does none. Raises
    :class:`~fedleak.errors.ModelError` where the arithmetic is not an elementwise affine map of the reordered input
    with constants (a learned scale; ``1 / x``; a zero scale; a change that moves the batch's dimension)."""
    peeled = _PEELED.get(model, None, lambda: _peel(model))
    if peeled is None:
        return model, None
    if peeled.layout:  # the stripped model reads another shape: the map is read on the model's own inputs' shape
        return peeled.stripped, _read_map(model, peeled, _layout_input_shape(model, peeled, input_shape, inputs))
    try:
        shape = as_network(peeled.stripped, input_shape=input_shape, inputs=inputs).input_shape
    except ModelError:  # a model the exact methods do not read (a GELU): its shape as the first-layer attack finds it
        shape = input_shape_of(peeled.stripped, input_shape=input_shape, inputs=inputs)[0]
    return peeled.stripped, _read_map(model, peeled, shape)


def _layout_input_shape(model: nn.Module, peeled: _Peeled, input_shape: Sequence[int] | None,
                        inputs: torch.Tensor | None) -> tuple[int, ...]:
    """One input's shape for a model whose forward changes its input's layout: the one given (or the inputs',
    ``model.input_shape``), else the one ordering of the shape the stripped model reads that the forward takes to
    it."""
    given = input_shape if input_shape is not None else inputs.shape[1:] if inputs is not None else \
        getattr(model, "input_shape", None)
    if given is not None:
        return tuple(int(v) for v in given)
    first = input_shape_of(peeled.stripped)[0]
    fits = {shape for shape in set(itertools.permutations(first)) if _layout_output(model, peeled, shape) == first}
    if len(fits) != 1:
        which = f"the input shapes {' and '.join(map(str, sorted(fits)))} give" if fits else "no input shape gives"
        raise ModelError(f"the model's forward changes its input's layout before its first layer, which reads "
                         f"{first}, and {which} that: pass input_shape= (the shape of one input as your data holds "
                         "it)")
    return fits.pop()


def _layout_output(model: nn.Module, peeled: _Peeled, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape the forward's arithmetic and layout changes make of one input of ``shape``; None where they do not
    run on it."""
    param = next(model.parameters(), None)
    probe = torch.zeros((1, *shape), dtype=F64, device=param.device if param is not None else None)
    try:
        return tuple(_run_chain(model, peeled, probe)[peeled.nodes[-1]].shape[1:])
    except (RuntimeError, IndexError, TypeError, ValueError):
        return None


def _run_chain(model: nn.Module, peeled: _Peeled, x: torch.Tensor) -> dict[fx.Node, torch.Tensor]:
    """The value of each of ``peeled``'s nodes for the batch ``x``, the model's constants read now; a cast that keeps
    the model's dtype (as ``as_network`` checks) is the identity."""
    casts = _keys_of(cast)
    interp = fx.Interpreter(model, graph=peeled.graph)
    interp.env = {peeled.input: x}
    values = {}
    with torch.no_grad():
        for node in peeled.nodes:
            if op_key(node) in casts:
                interp.env[node] = interp.env[node.args[0]]
                values[node] = interp.env[node]
                continue
            _constants(interp, node)
            interp.env[node] = interp.run_node(node)
            values[node] = interp.env[node].clone()  # a later in-place op (x.div_) would change it
    return values


def _keys_of(converter: Callable) -> frozenset:
    return frozenset(k for k, fn in CONVERTERS.items() if fn is converter)


LAYOUT = _keys_of(layout_change)  # permute, transpose, swapaxes, movedim: the values reordered


def _peel(model: nn.Module) -> _Peeled | None:
    with buffers_kept(model):  # tracing runs forward: a buffer it changes (a pass counter) is put back
        return _peel_traced(model)


def _peel_traced(model: nn.Module) -> _Peeled | None:
    try:
        gm = shared_trace(model)
    except ModelError:
        return None  # as_network says why
    nodes = list(gm.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]  # one: trace_model sees to it
    dependent = {placeholders[0]}
    chain: list[fx.Node] = []
    # among the arithmetic: reshapes, casts (as_network checks that a cast keeps the model's dtype; the map is read
    # through it as the identity), clone and contiguous
    passing = _keys_of(reshape) | _keys_of(cast) | _keys_of(identity) | LAYOUT
    for node in nodes:
        found: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), found.append)
        inputs = [n for n in found if n in dependent]
        if not inputs or node.op == "output" or shape_query(node):
            continue
        dependent.add(node)
        key = op_key(node) if node.op != "call_module" else None
        if key not in INPUT_ARITHMETIC and key not in passing:
            break
        if len(inputs) != 1 or inputs[0] is not (chain[-1] if chain else placeholders[0]):
            return None  # x - x.mean(), x * x: not a constant map (as_network refuses it)
        chain.append(node)
    arithmetic = tuple(n for n in chain if op_key(n) in INPUT_ARITHMETIC)
    layout = [n for n in chain if op_key(n) in LAYOUT]
    if not arithmetic and not layout:
        return None
    chain = chain[:max(chain.index(n) for n in (*arithmetic, *layout)) + 1]
    members = {n.name for n in (placeholders[0], *chain)}
    for node in arithmetic:
        position, _ = _operand(node, members)
        if str(getattr(node.target, "__name__", node.target)) in FIRST_ONLY and position != 0:
            raise ModelError(f"node '{node.name}' divides by the model's input: not an affine map of it, which is all "
                             "the exact methods read before the first layer")
        _check_constants(model, node, dependent)
    stripped = keep_every_tensor(trace_model(model), model)  # a second copy, whose graph loses the arithmetic
    by_name = {n.name: n for n in stripped.graph.nodes}
    for node in reversed(chain if layout else arithmetic):  # (with a change of layout, the reshapes go too)
        own = by_name[node.name]
        own.replace_all_uses_with(_operand(own, members)[1])
        stripped.graph.erase_node(own)
    _drop_unused(stripped.graph)
    stripped.recompile()
    stripped.training = model.training  # the attribute only: .train() would change the shared modules
    if getattr(model, "input_shape", None) is not None:
        stripped.input_shape = model.input_shape
    return _Peeled(stripped, gm.graph, placeholders[0], tuple(chain), arithmetic, bool(layout))



def _operand(node: fx.Node, members: set[str]) -> tuple[int, fx.Node]:
    """The position among ``node``'s arguments (keywords last) of the one that is the input or what the arithmetic
    made of it (a node named in ``members``), and that node."""
    operands = (*node.args, *node.kwargs.values())
    return next((i, a) for i, a in enumerate(operands) if isinstance(a, fx.Node) and a.name in members)


SHAPE_QUERIES = frozenset({("method", "size"), ("method", "dim"), builtins.getattr, recorded_len})


def shape_query(node: fx.Node) -> bool:
    """Whether ``node`` reads the input's shape (``x.size(0)``, ``x.shape[0]``), not its values."""
    if node.op == "call_method" or node.op == "call_function":
        key = op_key(node)
        if key in SHAPE_QUERIES:
            return True
        if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
            return shape_query(node.args[0])
    return False


def _check_constants(model: nn.Module, node: fx.Node, dependent: set[fx.Node]) -> None:
    """Refuse an arithmetic node whose other operand holds a trainable parameter (a learned input scale): its
    gradient is part of the update, which the exact methods do not read."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    stack = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node) and a not in dependent]
    while stack:
        n = stack.pop()
        if n.op == "get_attr" and n.target in trainable:
            raise ModelError(f"node '{node.name}' scales or shifts the model's input by the trainable parameter "
                             f"'{n.target}': a learned map, whose gradient the exact methods do not read; make it a "
                             "buffer (register_buffer) or freeze it (requires_grad=False)")
        found: list[fx.Node] = []
        fx.node.map_arg((n.args, n.kwargs), found.append)
        stack.extend(found)


def _drop_unused(graph: fx.Graph) -> None:
    """Erase the nodes nothing reads any more (the constants the arithmetic used), last first."""
    for node in reversed(list(graph.nodes)):
        if node.op in ("get_attr", "call_function", "call_method") and not node.users:
            graph.erase_node(node)


def _read_map(model: nn.Module, peeled: _Peeled, shape: tuple[int, ...]) -> InputMap:
    """The map's numbers from ``model``'s constants now (three probes: 0, 1 and random inputs, in float64; with a
    change of layout, the values 1..n too: :func:`_order`), checked affine, with the intermediate offsets that bound
    the client's rounding."""
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")

    def run(x: torch.Tensor) -> dict[fx.Node, torch.Tensor]:
        return _run_chain(model, peeled, x)

    def apply(x: torch.Tensor) -> torch.Tensor:
        return run(x)[peeled.nodes[-1]]

    probe_shape = (1, *shape)
    gen = torch.Generator(device="cpu").manual_seed(0)
    probes = [torch.zeros(probe_shape, dtype=F64), torch.ones(probe_shape, dtype=F64),
              torch.rand(probe_shape, dtype=F64, generator=gen) * 2 - 0.5]
    try:
        runs = [run(p.to(device, copy=True)) for p in probes]
    except RuntimeError as err:  # a per-pixel mean on flat inputs: the shape read off the first layer is not it
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ModelError(f"the model's arithmetic on its input does not run on inputs of shape {shape} ({first}); "
                         "pass input_shape= (the shape of one input) or the inputs") from None
    last = peeled.nodes[-1]
    z0, z1, zr = (r[last].to(F64).reshape(len(probes[0]), -1)[0] for r in runs)
    a, b = z1 - z0, z0
    xr = probes[2].reshape(len(probes[2]), -1)[0].to(a.device)
    order = _order(run, probes, last, a, b) if peeled.layout else None
    if order is not None:
        xr = xr[order.to(xr.device)]
    if len(a) != len(xr):
        raise ModelError(f"node '{last.name}': the model's arithmetic on its input turns {len(xr)} values, read as "
                         f"inputs of shape {tuple(shape)}, into {len(a)} (a constant broadcast beyond that shape, such "
                         "as a per-channel mean on flat inputs), so what its first layer reads is not a map of each "
                         "input value; pass input_shape= (the shape of one input, e.g. (3, 32, 32)) or the inputs")
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())) or bool((a == 0).any()):
        raise ModelError(f"node '{last.name}': the model's arithmetic on its input is not invertible (a scale of 0 "
                         "or not finite), so what its first layer reads does not give the input")
    if float((zr - (a * xr + b)).abs().max()) > AFFINE_TOL * float((a * xr).abs().max() + b.abs().max()):
        raise ModelError(f"node '{last.name}': the model's arithmetic on its input is not an elementwise affine map "
                         "of it (z = a x + b), which is all the exact methods read before the first layer")
    offsets = torch.zeros_like(a)
    for node in peeled.arithmetic:
        v0, v1 = (r[node].to(F64).reshape(len(probes[0]), -1)[0] for r in runs[:2])
        step = v1 - v0
        offsets += torch.where(step != 0, (v0 / step).abs(), torch.zeros_like(v0))
    written = tuple(n.name for n in peeled.nodes if n in peeled.arithmetic or op_key(n) in LAYOUT)  # (in order)
    first = tuple(runs[0][last].shape[1:]) if peeled.layout else None
    return InputMap(a.cpu(), b.cpu(), offsets.cpu(), float(torch.finfo(dtype).eps), written, apply,
                    None if order is None else order.cpu(), tuple(shape) if peeled.layout else None, first,
                    len(peeled.arithmetic))


def _order(run: Callable[[torch.Tensor], dict[fx.Node, torch.Tensor]], probes: list[torch.Tensor], last: fx.Node,
           a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """Which input value each first-layer value reads, where the forward changes the layout (None: each its own):
    read off a probe of the values 1, 2, ..., n, and checked to be a reordering that keeps each sample's values
    apart (a probe of two samples: each gives what it gives alone)."""
    ramp = torch.arange(1, probes[0].numel() + 1, dtype=F64).reshape(probes[0].shape)
    device = a.device
    found = ((run(ramp.to(device))[last].to(F64).reshape(-1) - b) / a).round().long() - 1
    n = probes[0].numel()
    if len(found) != n or not torch.equal(torch.sort(found).values.cpu(), torch.arange(n)):
        raise ModelError(f"node '{last.name}': the model's change of its input's layout does not reorder each "
                         "input's values (it moves the batch's dimension, or copies values), which is all the exact "
                         "methods read before the first layer")
    pair = run(torch.cat([probes[2], probes[1]]).to(device))[last].to(F64)
    alone = [run(p.to(device))[last].to(F64) for p in (probes[2], probes[1])]
    if pair.shape[0] != 2 or not all(torch.equal(pair[i], alone[i][0]) for i in range(2)):
        raise ModelError(f"node '{last.name}': the model's change of its input's layout moves the batch's dimension, "
                         "mixing the samples; the exact methods read each sample apart")
    return None if torch.equal(found.cpu(), torch.arange(n)) else found


def _constants(interp: fx.Interpreter, node: fx.Node) -> None:
    """Compute the constant operands of ``node`` (buffers, and what forward computes from them) into the
    interpreter's environment, from the live model."""
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), found.append)
    for n in found:
        if n not in interp.env:
            _constants(interp, n)
            interp.env[n] = interp.run_node(n)
