"""Arithmetic a model's forward does to its input before its first layer, read off and peeled.

A normalisation inside ``forward`` (``(x - mean) / std``, ``x / 255``, ``x * 2 - 1``; with numbers, buffers or any
tensor that does not depend on the input) maps each input value ``x`` to ``z = a x + b`` (``a``, ``b`` per value)
before the first layer reads it. The exact methods read the first layer's input, so :func:`peel_input_map` gives
them the model without that arithmetic (the same modules, shared, so its weights stay live) and the
:class:`InputMap`; :meth:`InputMap.to_first_layer` takes a client's inputs to what its first layer reads (the
client's own arithmetic, run again), and :meth:`InputMap.restore` maps what the exact attack rebuilt back to the
model's inputs (``x = (z - b) / a``), bounding what the client's rounding of the arithmetic adds.
"""

from __future__ import annotations

import builtins
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import fx, nn

from fedleak.errors import ModelError
from fedleak.nets.buffers import buffers_kept
from fedleak.nets.converters import cast, identity, reshape
from fedleak.nets.frontend import INPUT_ARITHMETIC, as_network, input_shape_of
from fedleak.nets.graph_reads import op_key
from fedleak.nets.ops import CONVERTERS
from fedleak.nets.tracing import PerStructure, keep_every_tensor, recorded_len, shared_trace, trace_model
from fedleak.reconstruction import Reconstruction

F64 = torch.float64
AFFINE_TOL = 1e-9  # relative: the arithmetic must give a x + b on a random probe to this (it is elementwise affine)
# of the exactness tolerance: the most the client's rounding of the arithmetic may take from it (the first layer's
# input is held to the rest). A normalisation's rounding is ~1e-7 of an input value: 5% of 1e-4 of a sample's own
# range covers it down to ranges of ~0.07 of the values' size
ROUNDING_SHARE = 0.05
# the ops whose input operand may only be the first one: c / x is not affine in x
FIRST_ONLY = frozenset({"truediv", "div", "div_", "itruediv"})


@dataclass(frozen=True, eq=False)
class InputMap:
    """``z = scale * x + shift`` per input value (flat, float64), what the model's forward computes before its
    first layer; ``written``: the nodes that compute it, as traced; ``offsets``: per value, the sum over those
    nodes of ``|intermediate offset|`` (each node's value is ``A_t (x + c_t)``), which bounds the client's
    rounding of the arithmetic in input units (:meth:`rounding`); ``eps``: the machine epsilon of the model's dtype.
    ``apply``: the arithmetic itself, run on a batch of inputs."""

    scale: torch.Tensor
    shift: torch.Tensor
    offsets: torch.Tensor
    eps: float
    written: tuple[str, ...]
    apply: Callable[[torch.Tensor], torch.Tensor]

    @property
    def uniform(self) -> bool:
        """Whether one ``a`` and one ``b`` serve every value (``(x - 0.5) / 0.25``, not per channel)."""
        return bool((self.scale == self.scale[0]).all() and (self.shift == self.shift[0]).all())

    def describe(self) -> str:
        """The map in words, e.g. ``z = 2.5 x - 1.25`` or ``z = a x + b per value (a in [...], b in [...])``."""
        a, b = self.scale, self.shift
        if self.uniform:
            return f"z = {float(a[0]):.6g} x {'-' if float(b[0]) < 0 else '+'} {abs(float(b[0])):.6g}"
        return (f"z = a x + b per value (a in [{float(a.min()):.4g}, {float(a.max()):.4g}], b in "
                f"[{float(b.min()):.4g}, {float(b.max()):.4g}])")

    def to_first_layer(self, x: torch.Tensor) -> torch.Tensor:
        """What the model's first layer reads for inputs ``x`` (a batch): the forward's own arithmetic, in ``x``'s
        dtype, in the input's shape."""
        return self.apply(x.clone()).reshape(x.shape)  # a copy: an in-place x.sub_(mean) keeps the caller's

    def to_inputs(self, z: torch.Tensor) -> torch.Tensor:
        """The model's inputs whose first-layer input is ``z`` (a batch), in float64 then ``z``'s dtype."""
        flat = z.detach().to(F64).reshape(z.shape[0], -1)
        a, b = self.scale.to(flat.device), self.shift.to(flat.device)
        return ((flat - b) / a).reshape(z.shape).to(z.dtype)

    def rounding(self, x: torch.Tensor) -> torch.Tensor:
        """Per sample of ``x`` (model inputs, a batch), the most the client's rounding of the arithmetic moves an
        input value, in input units: one epsilon of each node's value, taken back to the input
        (``eps * (|x| + |c_t|)`` per node), and float64's own inversion."""
        flat = x.detach().to(F64).reshape(x.shape[0], -1).abs()
        per_value = self.eps * (len(self.written) * flat + self.offsets.to(flat.device)) + 4e-16 * flat
        return per_value.amax(dim=1)

    def tolerance_in_first_layer(self, exact_tol: float, data_range: tuple[float, float] | None
                                 ) -> tuple[float, tuple[float, float] | None]:
        """The exactness tolerance and data range (None: each input's own) for the first layer's inputs that keep
        every input value's error within ``exact_tol`` of ``data_range`` (or of its own range) once the client's
        rounding of the arithmetic (up to :data:`ROUNDING_SHARE` of it, :meth:`restore`) is added: a data range is
        taken through the map (the hull of every value's image)."""
        tol = exact_tol * (1 - ROUNDING_SHARE)
        if data_range is None:
            return tol, None
        lo, hi = data_range
        ends = torch.stack([self.scale * lo + self.shift, self.scale * hi + self.shift])
        z_lo, z_hi = float(ends.min()), float(ends.max())
        return tol * (hi - lo) * float(self.scale.abs().min()) / max(z_hi - z_lo, 1e-300), (z_lo, z_hi)

    def restore(self, rec: Reconstruction, exact_tol: float, data_range: tuple[float, float] | None = None
                ) -> Reconstruction:
        """``rec`` (rebuilt first-layer inputs, held to :meth:`tolerance_in_first_layer`) in the model's inputs: each
        input mapped back, a stated error bound taken back to input units (over the smallest ``|a|``) plus the
        arithmetic's rounding, and a certificate kept where that rounding is within :data:`ROUNDING_SHARE` of
        ``exact_tol`` of ``data_range`` (None: of the sample's own range), else withdrawn, saying so; a note says
        what was read."""
        if len(rec) == 0:
            return replace(rec, notes=(*rec.notes, self.note()))
        x = self.to_inputs(rec.inputs)
        bound = self.rounding(x).cpu().numpy()
        flat = x.detach().to(F64).reshape(len(x), -1)
        spread = ((flat.amax(dim=1) - flat.amin(dim=1)).cpu().numpy() if data_range is None else
                  np.full(len(x), data_range[1] - data_range[0]))
        smallest = float(self.scale.abs().min())
        samples, certified = [], rec.certified.clone()
        for i, s in enumerate(rec.samples):
            eb = s.error_bound / smallest + bound[i] if np.isfinite(s.error_bound) else s.error_bound
            s = replace(s, error_bound=eb)
            if s.certified and not bound[i] <= ROUNDING_SHARE * exact_tol * spread[i]:
                why = (f"the model's arithmetic on its input ({self.describe()}) rounds it by up to {bound[i]:.2e} in "
                       f"the client's dtype, more than {ROUNDING_SHARE:g} of the exactness tolerance of "
                       f"{'the data range' if data_range is not None else 'its own range'} ({spread[i]:.3g}) allows: "
                       "the first layer's input is certified, this input is not"
                       + ("" if data_range is not None else "; data_range= (the data's) holds it to that range"))
                s = replace(s, certified=False, reason=why)
                certified[i] = False
            samples.append(s)
        whole = rec.batch_certified and bool(certified.all())
        return replace(rec, inputs=x, certified=certified, samples=tuple(samples), batch_certified=whole,
                       notes=(*rec.notes, self.note()))

    def note(self) -> str:
        """The map in a note: what fedleak's exact methods read, and how their inputs relate to the model's."""
        return (f"the model's forward maps its input before its first layer ({', '.join(self.written)}: "
                f"{self.describe()}); the exact methods read what the first layer reads, and what they rebuild is "
                "mapped back through the inverse")


@dataclass(frozen=True, eq=False)
class _Peeled:
    """The model without its input arithmetic (``stripped``) and what reading the map needs: the traced
    ``graph``, its ``input`` node, the arithmetic ``nodes`` in order (and the reshapes among them)."""

    stripped: nn.Module
    graph: fx.Graph
    input: fx.Node
    nodes: tuple[fx.Node, ...]
    arithmetic: tuple[fx.Node, ...]


_PEELED: PerStructure[_Peeled | None] = PerStructure()


def peel_input_map(model: nn.Module, *, input_shape: Sequence[int] | None = None,
                   inputs: torch.Tensor | None = None) -> tuple[nn.Module, InputMap | None]:
    """``model`` without the arithmetic its forward does to its input before its first layer, and that arithmetic
    as an :class:`InputMap` (read from the model's live constants, on inputs of the shape
    :func:`~fedleak.nets.as_network` finds with ``input_shape`` / ``inputs``); ``(model, None)`` where it does none.
    Raises :class:`~fedleak.errors.ModelError` where the arithmetic is not an elementwise affine map of the input
    with constants (a learned scale; ``1 / x``; a zero scale)."""
    peeled = _PEELED.get(model, None, lambda: _peel(model))
    if peeled is None:
        return model, None
    try:
        shape = as_network(peeled.stripped, input_shape=input_shape, inputs=inputs).input_shape
    except ModelError:  # a model the exact methods do not read (a GELU): its shape as the first-layer attack finds it
        shape = input_shape_of(peeled.stripped, input_shape=input_shape, inputs=inputs)[0]
    return peeled.stripped, _read_map(model, peeled, shape)


def _keys_of(converter: Callable) -> frozenset:
    return frozenset(k for k, fn in CONVERTERS.items() if fn is converter)


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
    passing = _keys_of(reshape) | _keys_of(cast) | _keys_of(identity)
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
    if not arithmetic:
        return None
    chain = chain[:chain.index(arithmetic[-1]) + 1]
    members = {n.name for n in (placeholders[0], *chain)}
    for node in arithmetic:
        position, _ = _operand(node, members)
        if str(getattr(node.target, "__name__", node.target)) in FIRST_ONLY and position != 0:
            raise ModelError(f"node '{node.name}' divides by the model's input: not an affine map of it, which is all "
                             "the exact methods read before the first layer")
        _check_constants(model, node, dependent)
    stripped = keep_every_tensor(trace_model(model), model)  # a second copy, whose graph loses the arithmetic
    by_name = {n.name: n for n in stripped.graph.nodes}
    for node in reversed(arithmetic):
        own = by_name[node.name]
        own.replace_all_uses_with(_operand(own, members)[1])
        stripped.graph.erase_node(own)
    _drop_unused(stripped.graph)
    stripped.recompile()
    stripped.training = model.training  # the attribute only: .train() would change the shared modules
    if getattr(model, "input_shape", None) is not None:
        stripped.input_shape = model.input_shape
    return _Peeled(stripped, gm.graph, placeholders[0], tuple(chain), arithmetic)


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
    """The map's numbers from ``model``'s constants now (three probes: 0, 1 and random inputs, in float64), checked
    affine, with the intermediate offsets that bound the client's rounding."""
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")

    casts = _keys_of(cast)

    def run(x: torch.Tensor) -> dict[fx.Node, torch.Tensor]:
        interp = fx.Interpreter(model, graph=peeled.graph)
        interp.env = {peeled.input: x}
        values = {}
        with torch.no_grad():
            for node in peeled.nodes:
                if op_key(node) in casts:  # one that keeps the model's dtype (as_network checks): the identity
                    interp.env[node] = interp.env[node.args[0]]
                    values[node] = interp.env[node]
                    continue
                _constants(interp, node)
                interp.env[node] = interp.run_node(node)
                values[node] = interp.env[node].clone()  # a later in-place op (x.div_) would change it
        return values

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
    return InputMap(a.cpu(), b.cpu(), offsets.cpu(), float(torch.finfo(dtype).eps),
                    tuple(n.name for n in peeled.arithmetic), apply)


def _constants(interp: fx.Interpreter, node: fx.Node) -> None:
    """Compute the constant operands of ``node`` (buffers, and what forward computes from them) into the
    interpreter's environment, from the live model."""
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), found.append)
    for n in found:
        if n not in interp.env:
            _constants(interp, n)
            interp.env[n] = interp.run_node(n)
