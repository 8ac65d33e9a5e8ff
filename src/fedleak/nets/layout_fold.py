"""A change of layout just before a ``Linear`` layer, folded into that layer: maps flattened channels-last, as models
ported from Keras or TensorFlow write it (``x.permute(0, 2, 3, 1).reshape(n, -1)``), a ``Conv1d``'s signals flattened
time-major (``x.transpose(1, 2).flatten(1)``).

The permuted maps, flattened, hold value ``order[k]`` of the maps' own flat (channel-major) order at position ``k``,
so the ``Linear`` layer that reads them computes ``W u = W' a`` with ``W'[:, order[k]] = W[:, k]``: one ``Linear``
layer on the maps flattened as they are, its columns reordered. The exact methods read that twin
(:mod:`fedleak.nets.dense_norms` builds it; the user's model is not changed). The client's gradient, a one-step
change and its rounding bound turn into the twin's by the same reordering of columns: nothing is computed, so
nothing is rounded, and there is nothing to check.

Only a change of layout whose output reaches one ``Linear`` module (called once) through flattens, reshapes and
eval-mode Dropout alone, and that comes after a layer with weights, is folded; one on the model's input is read as a
map of the input (:mod:`fedleak.nets.input_peel`), and any other is refused by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import fx, nn

from fedleak.errors import ModelError
from fedleak.logits_of import per_sample_logits
from fedleak.nets.buffers import buffers_kept
from fedleak.nets.converters import dropout, identity, layout_change, reshape
from fedleak.nets.frontend import converter_key, input_shape_of
from fedleak.nets.graph_reads import layer_weight
from fedleak.nets.input_shapes import PROBE_BATCH, probe
from fedleak.nets.layers import BatchNorm
from fedleak.nets.norm_fold import linear_twin
from fedleak.nets.ops import CONVERTERS, EXACT_SCOPE

_PASSED = (reshape, identity, dropout)  # what the chain from the change to the layer may hold besides changes


@dataclass(frozen=True)
class LayoutFold:
    """The change of layout ``nodes`` (in order) before the ``Linear`` at module path ``linear``, on maps of
    ``shape`` (one sample's, before the change): the twin's column ``j`` is the user's column ``columns[j]``.
    ``weight``, ``bias``: the layer's parameter names (``bias`` None without one)."""

    linear: str
    nodes: tuple[str, ...]
    shape: tuple[int, ...]
    columns: torch.Tensor
    weight: str
    bias: str | None

    @property
    def row_gain(self) -> float:
        """How much a row's entries grow by on the way to the twin's: not at all (they are reordered)."""
        return 1.0

    @property
    def rounds(self) -> bool:
        """Whether the twin's entries are computed (and rounded) from the user's: no, they are the same numbers."""
        return False

    def describe(self) -> str:
        return f"the change of layout '{', '.join(self.nodes)}' before Linear '{self.linear}'"

    def folded(self) -> str:
        """How the change is read, in words."""
        return (f"{self.describe()} (of {self.shape} maps) folded into the layer, its columns reordered to read the "
                "maps flattened as they are, the update (a gradient, or one step's change) read as its")

    def norms(self, model: nn.Module) -> tuple[BatchNorm, ...]:
        """The norms this fold takes out of ``model``: none."""
        return ()

    def parameter_names(self) -> tuple[str | None, ...]:
        """The names of the user's parameters the twin's layer replaces (None: absent)."""
        return (self.weight, self.bias)

    def twin(self, lin: nn.Linear) -> nn.Linear:
        """The ``Linear`` layer that reads the maps as they are: ``lin`` with its columns reordered, the same bias."""
        bias = None if lin.bias is None else lin.bias.detach()
        return linear_twin(lin, self.reorder(lin.weight.detach()), bias)

    def reorder(self, matrix: torch.Tensor) -> torch.Tensor:
        """A tensor of the layer's weight's shape (a gradient, a change, its rounding), its columns in the twin's
        order."""
        return matrix[:, self.columns.to(matrix.device)]

    def read(self, model: nn.Module, grads: dict[str, torch.Tensor]) -> str:
        """Replace the layer's weight's entry of ``grads`` by the twin's, in place; nothing to check, so the empty
        string."""
        if self.weight in grads:
            grads[self.weight] = self.reorder(grads[self.weight])
        return ""


def has_layout_change(gm: fx.GraphModule) -> bool:
    """Whether ``gm``'s graph changes a layout anywhere (a quick look)."""
    modules = dict(gm.named_modules())
    return any(_converter(n, modules) is layout_change for n in gm.graph.nodes)


def layout_chains(gm: fx.GraphModule, modules: dict[str, nn.Module], calls: dict[str, int]
                  ) -> list[tuple[fx.Node, list[fx.Node]]]:
    """Each ``Linear`` module (called once) whose input a change of layout after a layer with weights gives, through
    flattens, reshapes and eval-mode Dropout only: its node and the chain's nodes from the first change on."""
    found = []
    for node in gm.graph.nodes:
        if not (node.op == "call_module" and isinstance(modules.get(node.target), nn.Linear)
                and calls.get(node.target) == 1 and len(node.args) == 1 and not node.kwargs):
            continue
        chain: list[fx.Node] = []
        source = node.args[0]
        while (isinstance(source, fx.Node) and len(_value_users(source)) == 1
               and _converter(source, modules) in (*_PASSED, layout_change)):
            chain.insert(0, source)
            source = source.args[0] if source.args else None
        first = next((i for i, n in enumerate(chain) if _converter(n, modules) is layout_change), None)
        if first is not None and isinstance(source, fx.Node) and _after_a_layer(source, modules):
            found.append((node, chain[first:]))
    return found


def fold_shape(model: nn.Module, input_shape: tuple[int, ...] | None) -> tuple[int, ...] | None:
    """The input shape a change of layout in ``model`` is folded for: ``input_shape``, else the one the model's layers
    give (:func:`~fedleak.nets.frontend.input_shape_of`); None where none is known (the frontend then says why)."""
    if input_shape is not None:
        return tuple(input_shape)
    try:
        return input_shape_of(model)[0]
    except ModelError:
        return None


def layout_folds(model: nn.Module, gm: fx.GraphModule, modules: dict[str, nn.Module], calls: dict[str, int],
                 params: dict[int, str], shape: tuple[int, ...] | None) -> list[tuple[LayoutFold, list[fx.Node]]]:
    """Each change of layout before a ``Linear`` layer that can be folded, with the nodes of the change, for inputs of
    ``shape`` (one sample's); none where ``shape`` is None or the model does not run on it (the frontend then says
    why)."""
    chains = layout_chains(gm, modules, calls)
    if not chains or shape is None or probe(model, gm, shape) is not None:  # (probe records every node's shape)
        return []
    found = []
    for node, chain in chains:
        lin = modules[node.target]
        bias = params.get(id(lin.bias)) if lin.bias is not None else None
        weight = params.get(id(lin.weight), f"{node.target}.weight")  # (computed: weight normalisation, refused)
        fold = layout_fold(node, chain, lin, weight, bias, modules)
        if fold is not None:
            found.append((fold, [n for n in chain if n.name in fold.nodes]))
    return found


def layout_fold(node: fx.Node, chain: list[fx.Node], lin: nn.Linear, weight: str, bias: str | None,
                modules: dict[str, nn.Module]) -> LayoutFold | None:
    """The fold of ``chain`` (a change of layout and what follows it, each node's probe shape recorded in
    ``meta["shape"]``) before ``node``, the ``Linear`` ``lin``; None where a change's arguments are not constants
    or the chain does not end with the layer's flat input."""
    source = chain[0].args[0]
    if not isinstance(source, fx.Node) or source.meta.get("shape") is None:
        return None
    shape = tuple(int(s) for s in source.meta["shape"][1:])
    index = torch.arange(math.prod(shape)).reshape(1, *shape)
    for link in chain:
        if _converter(link, modules) is layout_change:
            args = link.args[1:]
            if any(isinstance(a, fx.Node) for a in (*args, *link.kwargs.values())):
                return None
            step = getattr(index, link.target) if link.op == "call_method" else (
                lambda *a, fn=link.target, **k: fn(index, *a, **k))
            index = step(*args, **link.kwargs)
        elif link.meta.get("shape") is not None:
            index = index.reshape(1, *link.meta["shape"][1:])
    order = index.reshape(-1)
    if order.numel() != lin.in_features:
        return None
    return LayoutFold(node.target, tuple(n.name for n in chain if _converter(n, modules) is layout_change), shape,
                      torch.argsort(order), weight, bias)


def check_same_outputs(model: nn.Module, twin: nn.Module, shape: tuple[int, ...], what: list[str]) -> None:
    """Raise :class:`ModelError` where ``twin`` (``model`` with the changes of layout ``what`` folded) does not compute
    ``model``'s logits on a random probe batch of ``shape`` (to float rounding): a forward the fold misread."""
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x = torch.rand(PROBE_BATCH, *shape, generator=torch.Generator().manual_seed(0), dtype=dtype).to(device)
    modes = [(m, m.training) for m in model.modules()]  # (in eval mode: a training-mode Dropout is refused later)
    try:
        with buffers_kept(model), torch.no_grad():
            model.eval()
            out, again = per_sample_logits(model(x), PROBE_BATCH), per_sample_logits(twin(x), PROBE_BATCH)
    finally:
        for module, training in modes:
            module.training = training
    tol = 1e-4 * float(out.abs().max()) + 1e-6
    if out.shape != again.shape or float((out - again).abs().max()) > tol:
        raise ModelError(f"{'; '.join(what)}: the model read with the maps flattened as they are does not compute "
                         f"the model's logits, so the change cannot be folded into the layer; {EXACT_SCOPE}")


def _value_users(node: fx.Node) -> list[fx.Node]:
    """The nodes that read ``node``'s values, not only its shape (``x.size(0)``, ``x.shape``, ``x.dim()``)."""
    return [u for u in node.users
            if not ((u.op == "call_method" and u.target in ("size", "dim"))
                    or (u.op == "call_function" and u.target is getattr and u.args[1:2] in (("shape",), ("ndim",)))
                    or (u.op == "call_function" and u.target is len))]


def _converter(node: fx.Node, modules: dict[str, nn.Module]) -> object:
    """The converter registered for ``node``'s op (None for another node, or one without a converter)."""
    if node.op not in ("call_module", "call_function", "call_method"):
        return None
    key = converter_key(node, modules.get(node.target) if node.op == "call_module" else None)
    return None if key is None else CONVERTERS.get(key)


def _after_a_layer(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` is computed from the output of a layer with weights (a module that holds weights, or a
    functional layer call)."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        module = modules.get(n.target) if n.op == "call_module" else None
        if (module is not None and next(module.parameters(), None) is not None) or layer_weight(n) is not None:
            return True
        todo.extend(n.all_input_nodes)
    return False
