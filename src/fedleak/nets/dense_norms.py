"""An eval-mode ``BatchNorm1d`` on a ``Linear`` layer's features, folded into that layer (and, through
:mod:`fedleak.nets.relu_norms`, one after a ReLU, folded into the ``Linear`` layer that reads it).

In eval mode a ``BatchNorm1d`` is an affine map per unit, ``u = a z + c`` with ``a = gamma / sqrt(var + eps)`` and
``c = beta - a mean`` (its running statistics), so ``Linear`` then ``BatchNorm1d`` is one ``Linear`` layer with
weight ``a W`` and bias ``a b + c`` (``b = 0`` where the ``Linear`` has no bias). The exact methods read that twin:
:func:`fold_dense_norms` builds it (the user's model is not changed), and :meth:`FoldedModel.gradient` turns the
client's gradient into the twin's:

- the folded weight's gradient is the ``Linear``'s, row ``j`` divided by ``a_j``: ``dL/d(aW)_j = dL/du_j x =
  (dL/dW_j) / a_j``;
- the folded bias's is ``beta``'s, ``dL/dbeta_j = dL/du_j`` (or ``dL/db_j / a_j`` where ``BatchNorm1d`` has no
  ``beta``);
- ``gamma``'s adds nothing about the batch: in eval mode it is fixed by the others,
  ``dL/dgamma_j = (W_j . dL/d(aW)_j + (b_j - mean_j) dL/du_j) / sqrt(var_j + eps)``. The fold checks that identity
  (and ``dL/db = a dL/dbeta`` where both are sent): a client that ran the layer in training mode, normalising by
  each batch's own statistics, does not meet it, and the attack then certifies nothing.

The same twin takes out an eval-mode ``BatchNorm1d`` on the model's input, which the exact methods read as a map of
the input (:mod:`fedleak.nets.input_norm`), and folds constant arithmetic on a ``Linear`` layer's output into that
layer (``logits / temperature``, ``logits + log_prior``: :mod:`fedleak.nets.output_affine`), and reads a layer whose
weight weight normalisation computes as the plain layer with that weight (:mod:`fedleak.nets.weight_norm`).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, replace

import torch
from torch import fx, nn

from fedleak.errors import ModelError
from fedleak.nets.input_norm import InputNorm, find_input_norm, missed, trainable_name
from fedleak.nets.layers import BatchNorm
from fedleak.nets.layout_fold import LayoutFold, check_same_outputs, fold_shape, has_layout_change, layout_folds
from fedleak.nets.network import Network, training_mode_cause, training_mode_note
from fedleak.nets.norm_fold import ScaledRows, linear_twin, norm_affine
from fedleak.nets.output_affine import AffineFold, affine_outputs, has_output_arithmetic
from fedleak.nets.relu_norms import ReluNormFold, relu_norm_fold, relu_norm_pairs
from fedleak.nets.tracing import PerStructure, keep_every_tensor, shared_trace, trace_model
from fedleak.nets.weight_norm import WeightNormFold, check_apart, has_weight_norm, weight_norm_folds
from fedleak.precision import update_precision
from fedleak.updates import GradientUpdate, check_matches_model

F64 = torch.float64

_FOLDED: PerStructure[FoldedModel | None] = PerStructure(most=1)  # each model's twin, while its values stay

#: why the exact route does not read a weight update of a model with such a norm
WEIGHTS_UNREAD = ("the exact route reads a model with BatchNorm1d on a Linear layer's features, after a ReLU or on "
                  "its input from its gradients (FedSGD) only: a FedAvg weight change moves the norm's parameters "
                  "with the layers', which the norm's reading does not follow (and clients that train run the norm "
                  "in training mode, which certifies nothing)")

# a norm in training mode subtracts the batch's mean, so the Linear bias's gradient before it sums to zero over the
# batch: at most this share of the weights' largest entry is rounding (in eval mode it is about their size over the
# inputs' values)
ZERO_BIAS = 1e-5


@dataclass(frozen=True)
class NormFold(ScaledRows):
    """One ``Linear`` (module path ``linear``) and the eval-mode ``BatchNorm1d`` (``norm``) on its features.

    ``scale``, ``shift``: the norm's ``a`` and ``c`` per unit; ``mean``, ``std``: its running mean and
    ``sqrt(var + eps)`` (float64). The parameter names of the ``Linear``'s weight and bias (None without one) and
    of the norm's ``gamma`` and ``beta`` (None without one)."""

    linear: str
    norm: str
    scale: torch.Tensor
    shift: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    weight: str
    bias: str | None
    gamma: str | None
    beta: str | None

    @property
    def folded_bias(self) -> str:
        """The twin's bias of the folded layer."""
        return self.bias or f"{self.linear}.bias"

    def describe(self) -> str:
        return f"BatchNorm1d '{self.norm}' on Linear '{self.linear}'"

    def folded(self) -> str:
        """How the norm is read, in words."""
        return (f"{self.describe()} folded into the Linear layer (weight a W, bias a b + c, from the norm's running "
                "statistics), the gradient read as that layer's")

    def norms(self, model: nn.Module) -> tuple[BatchNorm, ...]:
        """The norm this fold takes out of ``model``."""
        return (BatchNorm(self.norm, model.get_submodule(self.norm), self.gamma, self.beta),)

    def parameter_names(self) -> tuple[str | None, ...]:
        """The names of the user's parameters the twin's folded layer replaces (None: absent)."""
        return (self.weight, self.bias, self.gamma, self.beta)

    def twin(self, lin: nn.Linear) -> nn.Linear:
        """The ``Linear`` layer that computes ``lin`` then the norm."""
        return _folded_linear(lin, self)

    def read(self, model: nn.Module, grads: dict[str, torch.Tensor]) -> str:
        """Replace this fold's entries of ``grads`` by the folded layer's, in place; how the gradient misses eval
        mode's identities (empty where it does not)."""
        return _fold_gradient(self, model, grads)


Fold = NormFold | ReluNormFold | AffineFold | LayoutFold


@dataclass(frozen=True)
class FoldedGradient:
    """A client's gradient read as the twin's (``update``), and why nothing is certified from it, where so: it does
    not fit eval mode (``misfit``: a norm run in training mode mixes the batch's samples in every row), or its values
    carry a coarser format than float32 (``coarse``)."""

    update: GradientUpdate
    misfit: str = ""
    coarse: str = ""

    @property
    def reason(self) -> str:
        return self.misfit or self.coarse


@dataclass(frozen=True, eq=False)
class FoldedModel:
    """The user's model (``source``) read with its ``folds``: ``model`` is the twin (a ``torch.fx`` graph module sharing
    every other module with the user's), in which each folded ``Linear`` computes ``Linear`` then ``BatchNorm1d``
    and each layer of ``weight_norms`` is the plain layer with the weight its normalisation computes. The user's
    model is held weakly (``of``): the twin is kept per model, and would otherwise keep it alive."""

    model: nn.Module
    folds: tuple[Fold, ...]
    of: weakref.ref
    input_norm: InputNorm | None = None
    weight_norms: tuple[WeightNormFold, ...] = ()

    @property
    def source(self) -> nn.Module:
        """The user's model."""
        return self.of()

    @property
    def weights_unread(self) -> str:
        """Why the exact route does not read a weight update of the user's model; empty where it does (folds of
        constant arithmetic only: a step's change is the learning rate times the gradient, which turns into the
        twin's row by row as the gradient does)."""
        return WEIGHTS_UNREAD if self.input_norm is not None or any(f.norms(self.source) for f in self.folds) else ""

    @property
    def row_gain(self) -> float:
        """The most any folded row's entries grow by on the way to the twin's (over the folds)."""
        return max([1.0, *(f.row_gain for f in self.folds)])

    def read_into(self, net: Network) -> Network:
        """``net`` (read from the twin) with the notes and caveats of the norms taken out of it: read in eval mode,
        and a client that runs them in training mode certifies nothing."""
        norms = tuple(n for f in self.folds for n in f.norms(self.source))
        if self.input_norm is not None:
            norms += (BatchNorm(self.input_norm.name, self.input_norm.module, self.input_norm.gamma,
                                self.input_norm.beta),)
        read = [f.folded() for f in (*self.weight_norms, *self.folds)]
        if self.input_norm is not None:
            read.append(f"BatchNorm1d '{self.input_norm.name}' on the model's input read as a map of it (its running "
                        "statistics), the inputs rebuilt through its inverse")
        if not norms:
            return replace(net, notes=(*net.notes, "; ".join(read)))
        note = f"{'; '.join(read)}; {training_mode_note((), norms)}"
        return replace(net, notes=(*net.notes, note), caveats=(*net.caveats, training_mode_cause((), norms)),
                       folded_norms=(*net.folded_norms, *norms))

    def gradient(self, update: GradientUpdate, noise: dict[str, torch.Tensor] | None = None) -> FoldedGradient:
        """The twin's gradient, and why nothing can be certified from it (empty where something can): the client's
        does not fit eval mode (``misfit``), or its values carry a format coarser than float32 (a gradient computed
        under autocast), whose grid the division by the norm's scale leaves (``coarse``). A known transport error
        per entry grows by the largest ``1 / |a|`` with the rows (a layer with weight normalisation: its bound is the
        exact attack's, :mod:`fedleak.attacks.exact.weight_norm_bound`; ``noise``: each entry's own rounding, by the
        name of weight normalisation's ``v``, which its identity allows for)."""
        check_matches_model(self.source, update.gradients)
        precision = update_precision(update.gradients)
        grads = dict(update.gradients)
        unfit = [m for m in (f.read(self.source, grads, (noise or {}).get(f.v)) for f in self.weight_norms) if m]
        misfits: list[str] = []
        if self.input_norm is not None:  # (read on the client's own first-layer gradient, before any fold)
            misfits += [m for m in (self.input_norm.misfit(grads),) if m]
            for name in self.input_norm.names():
                grads.pop(name, None)
        for fold in self.folds:
            misfit = fold.read(self.source, grads)
            if misfit:
                misfits.append(misfit)
        error = update.error * self.row_gain
        folded = GradientUpdate(grads, num_examples=update.num_examples, error=error)
        if precision.coarse:  # (its rounding also blurs the identities, to its own epsilon)
            return FoldedGradient(folded, coarse=f"{precision.describe()}, whose rounding the folded layers' rows "
                                                 "(divided by their scale) no longer show: nothing is certified")
        if unfit:
            return FoldedGradient(folded, misfit=(
                f"{'; '.join(unfit)}: the update is not the gradient of the model with weight normalisation (a client "
                "that trained without it, or changed g's and v's gradients: noise): nothing is certified, and no "
                "input is read off its rows"))
        if misfits:
            return FoldedGradient(folded, misfit=(
                f"{'; '.join(misfits)}: the gradient does not fit the model's BatchNorm1d in eval mode (a client that "
                "runs it in training mode, model.train(), normalises by each batch's own statistics, which the exact "
                "methods do not model; so does one that changed the norm's tensors apart from the layer's: clipping "
                "each tensor to a norm, noise, sparsification): nothing is certified, and no input is read off its "
                "rows, which mix the batch's samples"))
        return FoldedGradient(folded)


def _fold_gradient(fold: NormFold, model: nn.Module, grads: dict[str, torch.Tensor]) -> str:
    """Replace ``fold``'s entries of ``grads`` by the folded layer's, in place; returns how the gradient misses eval
    mode's identities (empty where it does not)."""
    if fold.weight not in grads:  # a frozen layer sends none: the frontend's check of the head says so
        for name in (fold.bias, fold.gamma, fold.beta):
            grads.pop(name, None)
        return ""
    G = grads.pop(fold.weight)
    a = fold.scale.to(G.device)
    Gf = (G.to(F64) / a[:, None]).to(G.dtype)  # divided in float64, rounded once
    g_beta = grads.pop(fold.beta) if fold.beta is not None else None
    g_b = grads.pop(fold.bias) if fold.bias is not None else None
    g_gamma = grads.pop(fold.gamma) if fold.gamma is not None else None
    if g_beta is not None:
        gf = g_beta.to(F64)
    elif g_b is not None:
        gf = g_b.to(F64) / a
    else:
        raise ModelError(f"{fold.describe()}: the Linear layer has no bias and the BatchNorm1d no trainable shift "
                         "(beta), so the folded layer's bias has no gradient for the exact methods to read; "
                         "'first-layer', 'auto' and the optimisation attacks still apply")
    grads[fold.weight] = Gf
    grads[fold.folded_bias] = gf.to(G.dtype)
    misses: list[str] = []
    if g_b is not None and float(G.abs().max()) > 0 and float(g_b.abs().max()) <= ZERO_BIAS * float(G.abs().max()):
        misses.append(f"{fold.describe()}: the Linear bias's gradient is zero to rounding "
                      f"({float(g_b.abs().max()):.1e} where its weights' reaches {float(G.abs().max()):.1e}), as a "
                      "norm that subtracts each batch's own mean makes it")
    if g_beta is not None and g_b is not None:
        off = (g_b.to(F64) - a * gf).abs()
        size = g_b.to(F64).abs() + (a * gf).abs()
        if missed(off, size):
            misses.append(f"{fold.describe()}: the Linear bias's gradient is not its scale a times beta's "
                          f"(off by up to {worst(off, size):.1e} relative)")
    if g_gamma is not None:  # (the row products in the gradient's dtype: the identity is checked to 1e-3)
        lin = model.get_submodule(fold.linear)
        W = lin.weight.detach().to(device=G.device, dtype=G.dtype)
        b = (lin.bias.detach().to(device=G.device, dtype=F64) if lin.bias is not None
             else torch.zeros(W.shape[0], dtype=F64, device=G.device))
        centred = b - fold.mean.to(G.device)
        std = fold.std.to(G.device)
        expected = (torch.linalg.vecdot(W, Gf).to(F64) + centred * gf) / std
        magnitude = (torch.linalg.vecdot(W.abs(), Gf.abs()).to(F64) + centred.abs() * gf.abs()) / std
        off = (g_gamma.to(F64) - expected).abs()
        size = magnitude + g_gamma.to(F64).abs()
        if missed(off, size):
            misses.append(f"{fold.describe()}: gamma's gradient is not the one eval mode fixes it to (off by up to "
                          f"{worst(off, size):.1e} relative)")
    return "; ".join(misses)


def worst(off: torch.Tensor, size: torch.Tensor) -> float:
    return float((off / (size + size.mean() + 1e-30)).max())


def fold_dense_norms(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> FoldedModel | None:
    """``model`` with every ``BatchNorm1d`` that reads a ``Linear`` layer's features (and nothing else reads them)
    folded into that layer, or None where it has none. Raises :class:`ModelError` where a norm cannot be folded
    (a unit with ``gamma = 0``). The twin is kept while the model's structure and every tensor's values are
    unchanged (an in-place change, an optimizer's step or ``load_state_dict``, makes a new one), so that the
    frontend reads it once. A change of layout before a ``Linear`` layer is folded for inputs of ``input_shape``
    (one sample's; None: the one :func:`~fedleak.nets.frontend.input_shape_of` finds)."""
    layout = _changes_layout(model)
    if not any(isinstance(m, nn.BatchNorm1d) for m in model.modules()) and not _maps_a_linear_output(model) \
            and not has_weight_norm(model) and not layout:
        return None
    values = tuple((id(t), t._version) for t in (*model.parameters(), *model.buffers()))
    shape = fold_shape(model, input_shape) if layout else None
    return _FOLDED.get(model, (values, shape), lambda: _fold(model, shape))


def _changes_layout(model: nn.Module) -> bool:
    """Whether ``model``'s forward changes a layout (on its shared trace; False where it does not trace)."""
    try:
        return has_layout_change(shared_trace(model))
    except ModelError:
        return False


def _maps_a_linear_output(model: nn.Module) -> bool:
    """Whether ``model``'s forward does arithmetic on a ``Linear`` layer's output (on its shared trace; False where it
    does not trace, which the frontend reports)."""
    try:
        return has_output_arithmetic(shared_trace(model))
    except ModelError:
        return False


def _fold(model: nn.Module, shape: tuple[int, ...] | None) -> FoldedModel | None:
    gm = trace_model(model)
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    params = {id(p): n for n, p in model.named_parameters()}
    layouts = layout_folds(model, gm, modules, calls, params, shape)  # (on the graph as traced)
    normed = weight_norm_folds({t: modules[t] for t in calls}, params)
    twins: dict[str, nn.Module] = {}
    for f in normed:  # the other folds see the plain layer
        twins[f.layer] = modules[f.layer] = f.twin(modules[f.layer])
        params[id(twins[f.layer].weight)] = f.weight
    pairs = []
    for node in gm.graph.nodes:
        src = node.args[0] if node.op == "call_module" and len(node.args) == 1 and not node.kwargs else None
        if (isinstance(modules.get(node.target), nn.BatchNorm1d) and isinstance(src, fx.Node)
                and src.op == "call_module" and isinstance(modules.get(src.target), nn.Linear)
                and len(src.users) == 1 and calls[node.target] == 1 and calls[src.target] == 1
                and modules[node.target].running_mean is not None):
            pairs.append((src, node))
    on_input = find_input_norm(gm, modules, calls, params)
    taken = {src.target for src, _ in pairs}  # a Linear with a norm on its features and one before it: not read
    after = [(node, lin) for node, lin in relu_norm_pairs(gm, modules, calls) if lin.target not in taken]
    mapped = affine_outputs(gm, modules, calls, params, taken | {lin.target for _, lin in after})
    if not pairs and not after and not mapped and on_input is None and not normed and not layouts:
        return None
    folded = [src.target for src, _ in pairs] + [lin.target for _, lin in after] + [f.linear for f, _, _ in mapped]
    check_apart(normed, folded + [f.linear for f, _ in layouts], None if on_input is None else on_input[1].linear,
                modules)
    folds: list[Fold] = []
    for src, node in pairs:
        fold = _fold_of(src.target, node.target, modules[src.target], modules[node.target], params)
        folds.append(fold)
        twins[src.target] = fold.twin(modules[src.target])
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
    for node, lin in after:  # the norm's input (the ReLU's output) takes its place
        fold = relu_norm_fold(node.target, lin.target, modules[node.target], modules[lin.target], params)
        folds.append(fold)
        twins[lin.target] = fold.twin(modules[lin.target])
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
    for fold, layer, chain in mapped:  # the layer's output takes the mapped output's place
        folds.append(fold)
        twins[fold.linear] = fold.twin(modules[fold.linear])
        chain[-1].replace_all_uses_with(layer)
        for node in reversed(chain):
            gm.graph.erase_node(node)
    if on_input is not None:  # the first layer reads the norm's input; the map takes its place
        node, norm = on_input
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
    for fold, changes in layouts:  # last: the layer's columns reordered after any other fold of its rows
        folds.append(fold)
        twins[fold.linear] = fold.twin(twins.get(fold.linear, modules[fold.linear]))
        for node in changes:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    root = {n.target: twins.get(n.target, modules[n.target]) for n in gm.graph.nodes if n.op == "call_module"}
    root.update({n.target: _attr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"})
    twin = fx.GraphModule(root, gm.graph)
    folded_names = {name for f in (*folds, *normed) for name in f.parameter_names() if name}
    taken = [n.name for f in folds for n in f.norms(model)] + ([on_input[1].name] if on_input is not None else [])
    norm_state = {f"{name}.{k}" for name in taken for k in modules[name].state_dict()}
    keep_every_tensor(twin, model, skip=frozenset(folded_names | norm_state))
    recorded = getattr(model, "input_shape", None)
    if recorded is not None:
        twin.input_shape = tuple(recorded)
    twin.training = model.training  # its modules are the user's: their own modes stay
    if layouts:
        check_same_outputs(model, twin, shape, [fold.describe() for fold, _ in layouts])
    return FoldedModel(twin, tuple(folds), weakref.ref(model), None if on_input is None else on_input[1], normed)


def _fold_of(linear: str, norm: str, lin: nn.Linear, bn: nn.BatchNorm1d, params: dict[int, str]) -> NormFold:
    affine = norm_affine(norm, bn, "their Linear rows' gradient is 0 whatever the input, so the layer cannot be read "
                                   "through them")
    names = (trainable_name(p, params) for p in (lin.bias, bn.weight, bn.bias))
    return NormFold(linear, norm, affine.scale, affine.shift, affine.mean, affine.std, params[id(lin.weight)], *names)


def _folded_linear(lin: nn.Linear, fold: NormFold) -> nn.Linear:
    """The ``Linear`` layer that computes ``lin`` then the norm (float64 products, rounded once to its dtype)."""
    b = lin.bias.detach().to(F64) if lin.bias is not None else 0.0
    scale, shift = fold.scale.to(lin.weight.device), fold.shift.to(lin.weight.device)
    return linear_twin(lin, scale[:, None] * lin.weight.detach().to(F64), scale * b + shift,
                       fold.bias is not None or fold.beta is not None)


def _attr(module: nn.Module, target: str) -> object:
    obj: object = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
