"""Soteria: prune the representation features whose gradient leaks the input most directly.

Sun et al., "Provable defense against privacy leakage in federated learning from representation perspective",
CVPR 2021. The defended representation ``r`` is the input of one fully connected layer (for a CNN the first
FC layer after the convolutions, as in the paper). For each feature ``f`` of ``r`` and each sample ``s`` of
the client's batch, Soteria scores

    value(s, f) = ‖∂ r_f(x_s) / ∂ x_s‖₂ / |r_f(x_s)|

(its reference code divides the input-gradient norm by the feature's value; a feature that is 0 counts as
``+inf``), sums the scores over the samples and prunes the ``ratio`` fraction of features with the smallest
sum: the columns ``f`` of that layer's weight gradient are zeroed before the update is sent (the bias and
every other tensor are sent unchanged).

The Jacobian's row norms are computed in chunks, batched: a chunk of ``C`` features (reverse mode) or of ``C``
input coordinates (forward mode, when the input is much smaller than the representation) is one pass through
``C`` stacked copies of the client's batch, copy ``c`` selecting its own feature or coordinate; chunks are
sized to keep each pass's activations to about :data:`CHUNK_ELEMENTS` numbers. Samples are taken as
independent, as the model's forward in its current mode makes them (a BatchNorm layer in training mode
normalises over the batch, which the stacked copies leave unchanged; dropout draws a mask per copy).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from fedleak.autograd_mode import autograd_on
from fedleak.defenses.base import (
    ClientBatch,
    Tensors,
    UpdateFilter,
    check_open_range,
    register_defense,
)
from fedleak.errors import ModelError, OptionError
from fedleak.nets.buffers import buffers_kept

CHUNK_ELEMENTS = 2**23  # per chunk: at most ~this many numbers in each activation of the stacked copies
FORWARD_PASS_COST = 2  # a forward-mode pass costs about this many reverse-mode passes (measured on CPU)


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def default_layer(model: nn.Module) -> str:
    """The first ``nn.Linear`` that is not the model's first module with parameters (the first FC layer after a
    CNN's convolutions; a one-hidden-layer MLP's output layer)."""
    first = next((m for m in model.modules() if next(m.parameters(recurse=False), None) is not None), None)
    name = next((n for n, m in linear_layers(model).items() if m is not first), None)
    if name is None:
        raise OptionError("defense 'soteria' needs an nn.Linear layer after the model's first layer, and the model "
                          f"has none (its Linear layers: {list(linear_layers(model)) or 'none'}); "
                          "name the defended layer with the option layer")
    return name


def defended_layer(model: nn.Module, layer: str | None) -> tuple[str, nn.Linear]:
    """The name and module of the layer whose input is defended (``layer``, or :func:`default_layer`)."""
    linears = linear_layers(model)
    name = default_layer(model) if layer is None else layer
    if name not in linears:
        raise OptionError(f"option layer of defense 'soteria' must name an nn.Linear module of the model, got "
                          f"{name!r}; the model's Linear layers: {list(linears) or 'none'}")
    return name, linears[name]


def weight_key(layer: str) -> str:
    return f"{layer}.weight" if layer else "weight"


class Reached(Exception):
    """Raised by the pre-hook that captures the representation, to skip the rest of the forward pass."""


def representation(model: nn.Module, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The input of ``layer`` when ``model`` runs on ``x`` (the model is run only up to that layer)."""
    captured: list[torch.Tensor] = []

    def capture(module: nn.Module, args: tuple) -> None:
        captured.append(args[0])
        raise Reached

    handle = layer.register_forward_pre_hook(capture)
    try:
        model(x)
    except Reached:
        pass
    finally:
        handle.remove()
    if not captured:
        raise ModelError("defense 'soteria': the defended layer was not called in the model's forward pass")
    r = captured[0]
    if r.ndim != 2 or r.shape[0] != x.shape[0]:
        raise ModelError(f"defense 'soteria' needs the defended layer's input to be (batch, features), got shape "
                         f"{tuple(r.shape)}")
    return r


def widest_activation(model: nn.Module, x: torch.Tensor) -> int:
    """The most numbers any module of ``model`` outputs per sample (and the input's), to size the chunks."""
    widest = [int(x[0].numel())]

    def measure(module: nn.Module, args: tuple, output: object) -> None:
        if isinstance(output, torch.Tensor) and output.ndim > 0 and output.shape[0] == x.shape[0]:
            widest[0] = max(widest[0], int(output[0].numel()))

    handles = [m.register_forward_hook(measure) for m in model.modules()]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return widest[0]


def chunks(total: int, size: int) -> list[torch.Tensor]:
    return [torch.arange(s, min(total, s + size)) for s in range(0, total, size)]


def selectors(idx: torch.Tensor, batch: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """``(len(idx) * batch) x width``: the ``c``-th copy of the batch selects column ``idx[c]`` in every row."""
    out = torch.zeros(len(idx), batch, width, dtype=like.dtype, device=like.device)
    out[torch.arange(len(idx)), :, idx] = 1
    return out.reshape(len(idx) * batch, width)


def jacobian_row_norms_reverse(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                               chunk: int) -> torch.Tensor:
    """``batch x features``: ``‖∂ fn(x)_{s,f} / ∂ x_s‖₂`` for a per-sample ``fn``, by reverse mode.

    A chunk of ``C`` features is one backward pass through ``C`` stacked copies of the batch, copy ``c``
    selecting feature ``c``: one large batched pass instead of ``C`` small ones.
    """
    batch = x.shape[0]
    with torch.no_grad():
        features = int(fn(x).shape[1])
    norms = []
    for idx in chunks(features, chunk):
        with autograd_on():
            xs = x.detach().repeat(len(idx), *([1] * (x.ndim - 1))).requires_grad_(True)
            r = fn(xs)
            (grads,) = torch.autograd.grad(r, xs, selectors(idx, batch, features, r))
        norms.append(torch.linalg.vector_norm(grads.flatten(1).double(), dim=1).reshape(len(idx), batch))
    return torch.cat(norms).T.cpu()


def jacobian_row_norms_forward(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                               chunk: int) -> torch.Tensor:
    """The same norms by forward mode: a chunk of ``C`` input coordinates is one forward-mode pass through ``C``
    stacked copies of the batch, copy ``c`` perturbing coordinate ``c`` (cheaper than
    :func:`jacobian_row_norms_reverse` when the input has far fewer numbers than the representation)."""
    from torch.autograd import forward_ad

    batch, width = x.shape[0], int(x[0].numel())
    squares = torch.zeros((), dtype=torch.float64)
    for idx in chunks(width, chunk):
        xs = x.detach().repeat(len(idx), *([1] * (x.ndim - 1)))
        with torch.no_grad(), forward_ad.dual_level():
            tangent = selectors(idx, batch, width, xs).reshape(xs.shape)
            r = fn(forward_ad.make_dual(xs, tangent))
            columns = forward_ad.unpack_dual(r).tangent  # (C * batch) x features: ∂r/∂x_d for copy c's d
        squares = squares + columns.double().reshape(len(idx), batch, -1).square().sum(0).cpu()
    return squares.sqrt()


def feature_scores(model: nn.Module, layer: nn.Linear, inputs: torch.Tensor) -> torch.Tensor:
    """Soteria's score of every input feature of ``layer``: ``Σ_s ‖∂r_f(x_s)/∂x_s‖₂ / |r_f(x_s)|`` over the samples
    where ``r_f(x_s) != 0`` (float64; ``+inf`` for a feature that is 0 for every sample).

    The Jacobian's row norms come from reverse mode (one pass per feature) or, when the input has less than half
    as many numbers as the representation, forward mode (one pass per input coordinate, each about twice as
    costly). The model's buffers (BatchNorm's running statistics) are restored afterwards.
    """
    dtype = next(model.parameters()).dtype
    x = inputs.detach().to(dtype)
    with buffers_kept(model):
        with torch.no_grad():
            r = representation(model, layer, x)
            widest = widest_activation(model, x)
        batch, features = r.shape
        chunk = max(1, CHUNK_ELEMENTS // (batch * widest))
        def fn(v: torch.Tensor) -> torch.Tensor:
            return representation(model, layer, v)

        norms = None
        if FORWARD_PASS_COST * int(x[0].numel()) < features:
            try:
                norms = jacobian_row_norms_forward(fn, x, chunk)
            except NotImplementedError:  # an operation without a forward-mode derivative
                norms = None
        if norms is None:
            norms = jacobian_row_norms_reverse(fn, x, chunk)
    magnitude = r.abs().double().cpu()
    # a sample whose feature is 0 (an inactive ReLU) adds nothing to that column's gradient, so nothing to the
    # score; a feature inactive for the whole batch has a zero column already: +inf, never spent a pruning slot on
    active = magnitude > 0
    ratio = torch.where(active, norms / magnitude.clamp_min(1e-300), torch.zeros_like(norms)).sum(0)
    return torch.where(active.any(0), ratio, torch.full_like(ratio, math.inf))


def update_weight_key(tensors: Tensors) -> str | None:
    """The defended weight read from an update's names and shapes alone: the first 2-D ``weight`` after the first
    module's (what :func:`default_layer` picks when Linear layers are the model's only 2-D weights)."""
    names = list(tensors)
    if not names:
        return None
    first = names[0].rpartition(".")[0]
    for name in names:
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and module != first and tensors[name].ndim == 2:
            return name
    return None


@register_defense
@dataclass(frozen=True)
class Soteria(UpdateFilter):
    """Zero the columns of the defended layer's weight update for the ``ratio`` fraction of its input features
    with the smallest summed ``‖∂r_f/∂x‖ / |r_f|``."""

    name: ClassVar[str] = "soteria"
    summary: ClassVar[str] = ("prune the `ratio` fraction of an FC layer's input features with the smallest "
                              "||dr/dx|| / |r| (zero their weight columns)")
    source: ClassVar[str] = "Soteria, Sun et al. CVPR 2021"
    strengths: ClassVar[tuple[dict[str, object], ...]] = ({"ratio": 0.2}, {"ratio": 0.5}, {"ratio": 0.8})
    needs_batch: ClassVar[bool] = True

    ratio: float
    layer: str | None = None

    def check(self) -> None:
        check_open_range(self, "ratio", 0.0, 1.0)

    def pruned_features(self, batch: ClientBatch) -> tuple[str, torch.Tensor]:
        """The defended weight's name in the update and the indices of the pruned features (sorted)."""
        name, module = defended_layer(batch.model, self.layer)
        scores = feature_scores(batch.model, module, batch.inputs)
        count = math.floor(round(self.ratio * scores.numel(), 6))
        order = torch.argsort(scores, stable=True)  # ties: the lower index is pruned first
        return weight_key(name), torch.sort(order[:count]).values

    def apply(self, update: Tensors, batch: ClientBatch | None, generator: torch.Generator) -> dict[str, torch.Tensor]:
        if batch is None:
            raise OptionError("defense 'soteria' needs the client's batch (model, inputs) to score the features")
        key, pruned = self.pruned_features(batch)
        if key not in update:
            raise OptionError(f"defense 'soteria' defends '{key}', which the update does not hold "
                              f"(it holds {list(update)[:8]}{' ...' if len(update) > 8 else ''})")
        weight = update[key]
        mask = torch.ones(weight.shape[1], dtype=weight.dtype, device=weight.device)
        mask[pruned.to(weight.device)] = 0
        return {**update, key: weight * mask}

    def observe(self, simulated: Tensors, observed: Tensors) -> dict[str, torch.Tensor]:
        """``simulated`` with the defended weight's columns zeroed where the observed columns are all zero.

        Without ``layer`` the defended weight is read from the update's names and shapes
        (:func:`update_weight_key`); give ``layer`` where a model has other 2-D weights before its Linear layers.
        """
        key = weight_key(self.layer) if self.layer is not None else update_weight_key(observed)
        if key is None or key not in simulated or key not in observed:
            return dict(simulated)
        columns = (observed[key] != 0).any(dim=0).to(simulated[key].dtype)
        return {**simulated, key: simulated[key] * columns}
