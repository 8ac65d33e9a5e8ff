"""A user's ``forward`` as a ``torch.fx`` graph, traced as users write it.

:func:`trace_model` traces any ``nn.Module`` (an ``nn.Sequential`` of torch's own layers is built directly, which
costs no tracing). Two things users write that ``torch.fx`` refuses by itself are read while it traces:

- ``len(x)`` of the input (``x.view(len(x), -1)``), which only reads the batch size as ``x.size(0)`` does: while
  tracing, ``len`` records such a call as a node (a shape query), as ``torch.fx`` itself patches
  ``nn.Module.__call__`` while it traces; it is the builtin again afterwards;
- inputs of ``forward`` after the first that have defaults (``forward(self, x, labels=None)``): traced at their
  defaults (what a call with the batch alone computes), and the checks ``torch.fx`` adds for them dropped, so the
  graph takes the batch alone.

A forward that computes with its input's shape in Python (``x.size()[1:]`` in a loop, ``if x.dim() == 3``), which
``torch.fx`` refuses, is traced for inputs of one shape (:mod:`fedleak.nets.shaped_tracing`): the one asked for,
else the one the model records (``model.input_shape``), else the one its first layer gives
(:func:`~fedleak.nets.input_shapes.untraced_input_shape`). :func:`traced_shape` says which.
"""

from __future__ import annotations

import builtins
import inspect
import numbers
import threading
import weakref
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

import torch
from torch import fx, nn

from fedleak.errors import ModelError
from fedleak.nets.buffers import buffers_kept
from fedleak.nets.input_shapes import probe, untraced_input_shape
from fedleak.nets.log_softmax import fuse_log_softmax
from fedleak.nets.shaped_tracing import shaped_trace

# torch.fx patches ``nn.Module.__call__`` process-wide while it traces: a forward pass run meanwhile in another
# thread would be traced instead of computed. Tracing holds this lock; so does any forward pass that may run
# beside an attack in a thread of the same process (the federation server's evaluation).
TRACE_LOCK = threading.RLock()

_BUILTIN_LEN = builtins.len
_SHAPE_KEY = "fedleak_traced_shape"  # in GraphModule.meta: the input shape a forward that reads it was traced for
T = TypeVar("T")


class PerStructure(Generic[T]):
    """What was computed from a model and depends on its structure only (:func:`model_structure`), kept per model
    (weakly: it goes with the model) and per key, and forgotten when the structure changes: tracing a forward, or
    running it to learn a shape, costs milliseconds, and one attack asks the same of a model several times.
    ``most``: the keys kept per model (the oldest forgotten first; None: all)."""

    def __init__(self, most: int | None = None) -> None:
        self.most = most
        self._kept: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, dict[Hashable, T]]] = (
            weakref.WeakKeyDictionary())

    def __contains__(self, model: object) -> bool:
        """Whether anything is kept for ``model``."""
        return isinstance(model, nn.Module) and model in self._kept

    def get(self, model: nn.Module, key: Hashable, compute: Callable[[], T]) -> T:
        """The value kept for ``model`` and ``key``, else ``compute()``'s (kept where it returns)."""
        structure = model_structure(model)
        kept = self._kept.get(model)
        if kept is None or kept[0] != structure:
            kept = (structure, {})
            self._kept[model] = kept
        values = kept[1]
        if key not in values:
            value = compute()
            if self.most is not None and len(values) >= self.most:
                values.pop(next(iter(values)))
            values[key] = value
        return values[key]


_UNTRACED_SHAPES: PerStructure[tuple[int, ...]] = PerStructure()  # the input shape a first layer gives, by running
_SHARED: PerStructure[fx.GraphModule | str] = PerStructure()  # shared traces, or why the forward does not trace


def _is_plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def sequential_graph(model: nn.Module) -> fx.GraphModule | None:
    """The graph ``torch.fx`` would trace for an ``nn.Sequential`` of torch's own layers, built directly (the
    tracer's patching costs milliseconds); None for anything else."""
    if not _is_plain_sequential(model):
        return None
    leaves: list[str] = []

    def walk(module: nn.Module, prefix: str) -> bool:
        for name, child in module.named_children():
            qualified = f"{prefix}.{name}" if prefix else name
            if _is_plain_sequential(child):
                if not walk(child, qualified):
                    return False
            elif type(child).__module__.startswith("torch.nn."):
                leaves.append(qualified)
            else:  # a user's own module: fx traces through it
                return False
        return True

    if not walk(model, ""):
        return None
    graph = fx.Graph()
    x = graph.placeholder("input")
    for qualified in leaves:
        x = graph.call_module(qualified, (x,))
    graph.output(x)
    return fx.GraphModule(model, graph)


def trace_model(model: nn.Module, shape: tuple[int, ...] | None = None) -> fx.GraphModule:
    """``model``'s forward as a fresh ``torch.fx`` graph of the batch alone (its modules and attributes shared with
    ``model``), or the :class:`~fedleak.errors.ModelError` saying why it does not trace. ``shape`` (one input's)
    is the shape to trace a forward that computes with its input's shape for; it is found where not given."""
    direct = sequential_graph(model)
    if direct is not None:
        return direct
    defaults = _defaults(model)
    try:  # a forward that updates a buffer in place (a counter) does so on the real buffer while it is traced
        with TRACE_LOCK, _len_recorded(), buffers_kept(model):
            gm = fx.symbolic_trace(model, concrete_args=defaults or None)
    except Exception as err:  # torch.fx raises many kinds (TraceError, TypeError, ...)
        gm = _traced_for_shape(model, shape, defaults, err)
    if defaults:
        _drop_specialised(gm)
    fuse_log_softmax(gm)  # torch.log(F.softmax(z, dim=1)) is F.log_softmax(z, dim=1)
    inputs = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise ModelError(f"the model's forward takes {len(inputs)} inputs ({', '.join(inputs)}); fedleak needs one, "
                         "the batch: give the others defaults (forward(self, x, mask=None)), which it traces the model "
                         "at")
    return gm


def shared_trace(model: nn.Module, shape: tuple[int, ...] | None = None) -> fx.GraphModule:
    """:func:`trace_model`'s graph of ``model``, traced once per model structure (and, for a forward that computes
    with its input's shape, per ``shape``) and shared by the readers that do not change it (they may write its
    nodes' ``meta``, as a probe run does). Raises the same :class:`~fedleak.errors.ModelError` as
    :func:`trace_model`, every time."""
    found = _SHARED.get(model, None, lambda: _traced_or_why(model, None))
    if shape is not None and (isinstance(found, str) or traced_shape(found) is not None):  # traced for one shape
        found = _SHARED.get(model, tuple(shape), lambda: _traced_or_why(model, tuple(shape)))
    if isinstance(found, str):
        raise ModelError(found)
    return found


def _traced_or_why(model: nn.Module, shape: tuple[int, ...] | None) -> fx.GraphModule | str:
    try:
        return trace_model(model, shape)
    except ModelError as err:
        return str(err)


def traced_shape(gm: fx.GraphModule) -> tuple[int, ...] | None:
    """The one input shape ``gm`` was traced for (a forward that computes with its input's shape), else None."""
    return gm.meta.get(_SHAPE_KEY)


def _traced_for_shape(model: nn.Module, shape: tuple[int, ...] | None, defaults: dict[str, Any],
                      err: Exception) -> fx.GraphModule:
    """``model``'s forward traced for inputs of one shape, where ``torch.fx`` refused it with ``err``; the
    :class:`~fedleak.errors.ModelError` of ``err`` where it still does not trace (it depends on the values)."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    refusal = ModelError(f"could not trace {type(model).__name__}.forward with torch.fx ({first}); fedleak's exact "
                         "methods need a forward whose control flow does not depend on its input's values, dtype or "
                         "batch size (its other dimensions may); 'auto' and the optimisation attacks (dlg, idlg, ig, "
                         "dlm, dlm+) need only autograd and still apply")
    try:
        shape = shape or _model_shape(model)
    except ModelError as why:  # a forward that reads only its input's shape traces for one, which is not known
        raise ModelError(f"{refusal} (if it computes with its input's shape only, fedleak traces it for one input "
                         f"shape, which it could not find: {why})") from None
    try:  # the shaped trace runs the forward on a tensor of that shape: the model's buffers are kept as they were
        with TRACE_LOCK, _len_recorded(), buffers_kept(model):
            gm = shaped_trace(model, shape, defaults or None)
    except Exception:  # what torch.fx raises: the forward reads the values, or the shape does not suit it
        why = probe(model, None, shape)
        if why is not None:
            raise ModelError(f"the model does not run on inputs of shape {shape} ({why}); pass the right "
                             "input_shape=") from None
        raise refusal from None
    gm.meta[_SHAPE_KEY] = shape
    return gm


def _model_shape(model: nn.Module) -> tuple[int, ...]:
    """The input shape ``model`` records, else the one its first layer gives (kept per model structure)."""
    recorded = getattr(model, "input_shape", None)
    if recorded is not None:
        return tuple(int(s) for s in recorded)
    return _UNTRACED_SHAPES.get(model, None, lambda: untraced_input_shape(model)[0])


#: the types of plain values a module may hold that tracing bakes into the graph where ``forward`` reads them
_PLAIN = frozenset({int, float, bool, str, type(None)})


def _plain_attributes(module: nn.Module) -> tuple:
    """``module``'s public attributes that hold plain values (numbers, strings, tuples of them): ``self.temperature =
    2.0``, ``self.mean = 0.5``, Dropout's ``p``. Tracing bakes those ``forward`` reads into the graph, so a change of
    one is a change of what the trace computes."""
    return tuple([(k, v) for k, v in module.__dict__.items() if k[0] != "_" and (_plain(v) or (
        type(v) is tuple and all(_plain(e) for e in v)))])


def _plain(value: object) -> bool:
    """A number (Python's or numpy's), a string or None."""
    return type(value) in _PLAIN or isinstance(value, numbers.Number)


def model_structure(model: nn.Module) -> tuple:
    """What tracing depends on: the modules (identity, type, mode, plain attributes) and every tensor's shape, dtype
    and device."""
    mods = tuple((name, id(m), type(m), m.training, _plain_attributes(m)) for name, m in model.named_modules())
    tensors = tuple((name, tuple(t.shape), t.dtype, t.device)
                    for name, t in (*model.named_parameters(), *model.named_buffers()))
    return mods, tensors, getattr(model, "input_shape", None)


def keep_every_tensor(gm: fx.GraphModule, model: nn.Module, skip: frozenset[str] = frozenset()) -> fx.GraphModule:
    """``gm`` (traced from ``model``, which keeps only what ``forward`` reads) with every other parameter and buffer
    of ``model``'s state dict put back under its own name (the same tensors), so that updates and state dicts keyed
    like ``model``'s fit it; the names in ``skip`` are left out."""
    present = gm.state_dict(keep_vars=True)
    for name, value in model.state_dict(keep_vars=True).items():
        if name not in present and name not in skip:
            _attach(gm, name, value)
    return gm


def _attach(gm: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put the parameter or buffer ``name`` (dotted) on ``gm``, creating plain parent modules as needed."""
    *path, leaf = name.split(".")
    owner = gm
    for part in path:
        child = getattr(owner, part, None)
        if not isinstance(child, nn.Module):
            child = nn.Module()
            owner.add_module(part, child)
        owner = child
    if isinstance(value, nn.Parameter):
        owner.register_parameter(leaf, value)
    else:
        owner.register_buffer(leaf, value)


def _defaults(model: nn.Module) -> dict[str, Any]:
    """The inputs of ``model``'s forward after the first that have defaults, at their defaults (empty where it
    has none, or where one has no default: the frontend then says how many inputs it takes)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    named = [p for p in params[1:] if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if not params or any(p.default is p.empty for p in named):
        return {}
    return {p.name: p.default for p in named}


def _drop_specialised(gm: fx.GraphModule) -> None:
    """Erase the placeholders of the inputs traced at their defaults, with the checks ``torch.fx`` made of them,
    where nothing else reads them (the batch's placeholder is the first)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node in placeholders[1:]:
        reads = _readers(node)
        if any(n.op == "output" for n in reads):
            continue
        for n in sorted(reads, key=lambda n: -list(gm.graph.nodes).index(n)):
            gm.graph.erase_node(n)
        gm.graph.erase_node(node)
    gm.recompile()


def _readers(node: fx.Node) -> set[fx.Node]:
    """Every node that reads ``node``, directly or through others."""
    found: set[fx.Node] = set()
    stack = list(node.users)
    while stack:
        n = stack.pop()
        if n not in found:
            found.add(n)
            stack.extend(n.users)
    return found


def recorded_len(obj: Any) -> Any:
    """``len`` that records itself on a traced value, else the builtin. The node calls this function, so a graph
    module traced again (a model with its input arithmetic peeled) records it again."""
    if isinstance(obj, fx.Proxy):
        return obj.tracer.create_proxy("call_function", recorded_len, (obj,), {})
    return _BUILTIN_LEN(obj)


@contextmanager
def _len_recorded() -> Iterator[None]:
    """While tracing: ``len`` of a traced value is recorded (callers hold the tracing lock)."""
    builtins.len = recorded_len
    try:
        yield
    finally:
        builtins.len = _BUILTIN_LEN
