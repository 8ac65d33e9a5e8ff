"""What a server captured from a client, read as it comes rather than as a fedleak update.

* A **list of tensors** (or numpy arrays) is named by the model: a list of gradients in ``model.parameters()`` order
  (``[p.grad for p in model.parameters()]``, ``torch.autograd.grad``'s tuple), or of weights in
  ``model.state_dict()`` order (what Flower's clients send: ``[v.cpu().numpy() for v in state_dict().values()]``).
* A **dict that holds the client's weights** after local training (a FedAvg client sends its new weights, not a
  gradient) is read as a :class:`~fedleak.updates.WeightUpdate` whose weights before are the model's own (the
  round's weights, which the server sent). What tells weights from a gradient (:class:`WeightsEvidence`): the
  model's buffers (running statistics) among the entries, which no gradient has; entries within
  :data:`WEIGHTS_DISTANCE` of the model's weights (relative, over all of them), where a gradient is about as far
  from the weights as they are from zero; or :data:`MIN_UNCHANGED` of the model's nonzero weights kept bit for bit,
  as local training keeps those its data gave no gradient (a gradient is 0 there). A client that moved its weights
  further, with no such entries (Adam at a large learning rate on natural images, say), is told by ``kind``.
* A **dict that holds the client's weight change** (``new - old``, or ``old - new``: frameworks that send deltas)
  is read as a :class:`~fedleak.updates.WeightUpdate` from the model's weights too, told by its entries lying on the
  float spacing of the weights (:mod:`fedleak.weight_change`), or by ``kind="change"``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from fedleak.binary import as_two_class
from fedleak.errors import UpdateError
from fedleak.nets.unused import unused_parameters
from fedleak.state_names import renamed
from fedleak.updates import (
    ClientUpdate,
    GradientUpdate,
    WeightUpdate,
    as_gradient_update,
    in_model_dtype,
    trainable_parameters,
)
from fedleak.weight_change import NEAR, UNSIGNED, as_weights_after, change_sign, grid_evidence

WEIGHTS_DISTANCE = 0.5  # ||T - W|| / ||W|| at most this: T is the model's weights moved by local training
MIN_UNCHANGED = 16  # this many nonzero weights kept bit for bit: T is weights (a gradient equals one by chance only)
SCREEN = 4096  # values a gradient is told on (spread over its largest entry)
SCREEN_DISTANCE = 0.75  # ... when they are at least this far from the weights (a gradient: about 1) and none is kept
KINDS = ("auto", "gradient", "weights", "change")  # what a plain dict or list of tensors holds
READ_AS = "read_as"  # the metadata key of a WeightUpdate read from a client's weights: how it was read


def named_like(model: nn.Module, tensors: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """A list of tensors keyed by the model's names: its trainable parameters' (gradients, in
    ``model.parameters()`` order), all its parameters', or its state dict's (weights, as Flower's clients send
    them), whichever has as many entries; raises :class:`UpdateError` when none has, or a shape does not fit."""
    orders = {"trainable parameter(s)": trainable_parameters(model), "parameter(s)": dict(model.named_parameters()),
              "state dict entries": model.state_dict()}
    order = next((named for named in orders.values() if len(named) == len(tensors)), None)
    if order is None:
        counts = ", ".join(f"{len(named)} {what}" for what, named in orders.items())
        raise UpdateError(f"the update is a list of {len(tensors)} tensor(s), but the model has {counts}: pass one "
                          "gradient per trainable parameter in model.parameters() order, the weights in "
                          "model.state_dict() order, or a dict keyed by their names")
    out = {}
    for k, (t, (name, p)) in enumerate(zip(map(as_tensor, tensors), order.items())):
        if t is None:  # a parameter's .grad where no gradient reached it (see with_unused_gradients)
            out[name] = None
            continue
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(p.shape):
            got = f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise UpdateError(f"the update's entry {k} ({got}) does not fit the model's '{name}' (shape "
                              f"{tuple(p.shape)}): pass the tensors in model.parameters() or model.state_dict() "
                              "order")
        out[name] = t
    return out


def read_update(model: nn.Module, captured: object, *, num_examples: int | None = None,
                kind: str = "auto") -> ClientUpdate:
    """What a server captured from a client, as an update of ``model``: a :class:`GradientUpdate` or
    :class:`WeightUpdate` as it is, a dict or list of gradients, or of the client's weights after local training
    (a FedAvg reply as Flower delivers it: ``parameters_to_ndarrays(fit_res.parameters)``), read as a
    :class:`WeightUpdate` from ``model``'s weights, the round's (:func:`read_captured`; ``kind`` as there).
    ``num_examples``: the number of examples the client reported (Flower's ``fit_res.num_examples``), which
    the exact route needs to check a weight update's samples jointly."""
    update, _ = read_captured(model, captured, kind)
    if isinstance(update, Mapping):
        update = GradientUpdate(update)
    if not isinstance(update, (GradientUpdate, WeightUpdate)):
        raise UpdateError("an update must be a GradientUpdate, a WeightUpdate, or a dict or list of tensors; got "
                          f"{type(update).__name__}")
    return update if num_examples is None else replace(update, num_examples=num_examples)


def as_attacked(model: nn.Module, update: object) -> tuple[nn.Module, object, tuple[str, ...]]:
    """The model and update as the attacks and the plan read them, and notes on how: the update read as it came
    (:func:`read_captured`) in the model's dtype where it came in a finer one (:func:`~fedleak.updates.in_model_dtype`),
    and a single-logit model as its two-class twin (:func:`fedleak.binary.as_two_class`)."""
    update, captured = read_captured(model, update)
    update, unused = with_unused_gradients(model, update)
    update = in_model_dtype(model, update)  # float64 from a float32 model: read in the dtype it was computed in
    model, update, twin = as_two_class(model, update)
    return model, update, (*captured, *unused, *twin)


def with_unused_gradients(model: nn.Module, update: object) -> tuple[object, tuple[str, ...]]:
    """A gradient (a :class:`GradientUpdate` or a dict) with zeros for the trainable parameters it holds no gradient
    for (None, or absent) that ``model``'s forward never reads (:func:`~fedleak.nets.unused.unused_parameters`: a
    client's ``.grad`` stays None there), and a note naming them; anything else as it is. A used parameter without
    a gradient is left for the update's check to report."""
    tensors = update.gradients if isinstance(update, GradientUpdate) else update
    if not isinstance(tensors, Mapping) or isinstance(update, WeightUpdate):
        return update, ()
    given = {k: v for k, v in tensors.items() if v is not None}
    params = trainable_parameters(model)
    absent = [name for name in params if name not in given]
    unused = unused_parameters(model) if absent else frozenset()
    filled = [name for name in absent if name in unused]
    if not filled and len(given) == len(tensors):
        return update, ()
    like = next((v for v in given.values() if isinstance(v, torch.Tensor)), None)
    zeros = {name: torch.zeros(params[name].shape, dtype=like.dtype if like is not None else params[name].dtype,
                               device=like.device if like is not None else params[name].device) for name in filled}
    gradients = {name: given.get(name, zeros.get(name)) for name in params if name in given or name in zeros}
    gradients.update({k: v for k, v in given.items() if k not in params})  # names the update's check reports
    note = (f"the update holds no gradient for {', '.join(filled)} (None or absent): the model's forward does not "
            "use them, so none reaches them; read as 0") if filled else ""
    out = replace(update, gradients=gradients) if isinstance(update, GradientUpdate) else gradients
    return out, (note,) if note else ()


def read_captured(model: nn.Module, update: object, kind: str = "auto") -> tuple[object, tuple[str, ...]]:
    """``update`` as fedleak reads it, and a note on how where it was not a fedleak update: a list keyed by
    :func:`named_like`, and a dict of the client's weights read as a :class:`WeightUpdate` from the model's
    weights (its metadata :data:`READ_AS` keeps the note, also when :func:`~fedleak.update_files.load_update` read
    it). ``kind``: what a plain dict or list holds, ``"gradient"``, ``"weights"``, ``"change"`` (a weight change,
    :func:`read_change`) or ``"auto"`` (weights where :func:`weights_evidence` says so, a change where
    :func:`~fedleak.weight_change.grid_evidence` does). Anything else is returned as it is, for the caller to
    validate."""
    kind = check_kind(kind)
    if isinstance(update, (list, tuple)):
        update = named_like(model, update)
    own = model.state_dict()
    update, renaming = with_model_names(update, own)
    if isinstance(update, Mapping) and kind != "gradient":
        unknown = sorted(set(update) - set(own))
        evidence = None if unknown or kind == "change" else weights_evidence(model, update)
        if kind in ("weights", "change") and unknown:
            raise UpdateError(f"the client's {kind} do not match the model: unexpected {unknown[:5]}")
        found = evidence is not None and evidence.holds_weights
        grid = None if unknown or found or kind == "weights" else grid_evidence(model, update)
        if kind == "change" or (grid is not None and grid.holds_change):
            update = read_change(model, update, own, f"({grid.said()})" if grid is not None and grid.holds_change
                                 else "(as told)", renaming)
            renaming = ""  # the weight update's metadata keeps it
        elif kind == "weights" or found:
            how = (f"the update holds the client's weights ({evidence.said()}), not a gradient" if found else
                   "the update holds the client's weights, as told")
            how += ": read as a FedAvg update from the model's weights (the round's)" + (renaming and "; " + renaming)
            renaming = ""  # the weight update's metadata keeps it
            before = {k: own[k].detach().clone() for k in update}
            if all(torch.equal(before[k], v) for k, v in update.items()):
                raise UpdateError("the client's weights are the model's own, so nothing changed: pass the model as "
                                  "the server sent it (the round's weights, before the client's local training)")
            update = WeightUpdate(before=before, after=dict(update), metadata={READ_AS: how})
    read_as = update.metadata.get(READ_AS) if isinstance(update, WeightUpdate) else None
    return update, tuple(filter(None, (renaming, read_as if isinstance(read_as, str) else "")))


def with_model_names(update: object, own: Mapping[str, torch.Tensor]) -> tuple[object, str]:
    """``update`` (a dict, a :class:`GradientUpdate` or a :class:`WeightUpdate`) keyed by ``own``'s names where
    its names carry a wrapper's common prefix (:func:`~fedleak.state_names.renamed`), and a note saying so."""
    if isinstance(update, Mapping):
        update, change = renamed({name: as_tensor(value) for name, value in update.items()}, own)
    elif isinstance(update, GradientUpdate) and isinstance(update.gradients, Mapping):
        gradients, change = renamed(update.gradients, own)
        update = update if change is None else replace(update, gradients=gradients)
    elif isinstance(update, WeightUpdate) and isinstance(update.before, Mapping):
        before, change = renamed(update.before, own)
        if change is not None:
            update = replace(update, before=before, after={change.name(k): v for k, v in update.after.items()})
    else:
        change = None
    return update, "" if change is None else "read with the model's names: " + change.said("the update's")


def read_change(model: nn.Module, change: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], why: str,
                renaming: str = "") -> WeightUpdate:
    """A client's weight change as a :class:`WeightUpdate` from the model's weights (the round's): ``new - old``
    where the output layer reads it so, ``old - new`` where it reads the other way, else ``new - old`` with the
    sign marked unread (:data:`~fedleak.weight_change.UNSIGNED`). ``why``: what tells it a change, for the note."""
    for name, value in change.items():
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(own[name].shape):
            got = f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise UpdateError(f"the client's change of '{name}' ({got}) does not fit the model's (shape "
                              f"{tuple(own[name].shape)})")
    sign = change_sign(model, change)
    before = {k: own[k].detach().clone() for k in change}
    after = as_weights_after(before, change, sign or 1)
    how = (f"the update holds the client's weight change {why}, not a gradient: read as "
           f"{'old - new' if sign == -1 else 'new - old'} from the model's weights (the round's)")
    how += (", as its output layer's columns read" if sign else
            "; with fewer than four classes its sign is not read (the certified attacks try both)")
    how += renaming and "; " + renaming
    return WeightUpdate(before=before, after=after, metadata={READ_AS: how, UNSIGNED: sign is None})


def read_rate_scaled_change(model: nn.Module, update: object, learning_rate: float) -> WeightUpdate:
    """A gradient that is a one-step weight change divided by the client's ``learning_rate`` (``(old - new) / lr``,
    as a FedSGD-style pseudo-gradient is computed from two rounds' weights), read as that change from the model's
    weights (the round's) with the rate, where times the rate its small entries lie on the weights' float spacing
    (:func:`~fedleak.weight_change.grid_evidence`); else :class:`UpdateError` says what ``learning_rate`` is for."""
    grads = as_gradient_update(update)
    own = model.state_dict()
    known = {k: g for k, g in grads.gradients.items() if k in own}
    grid = grid_evidence(model, known, learning_rate) if len(known) == len(grads.gradients) else None
    if grid is None or not grid.holds_change:
        seen = "" if grid is None else f" ({grid.on_grid:,} of {grid.entries:,} small entries times it lie there)"
        raise UpdateError("learning_rate is the step size of a FedAvg client's local SGD: pass it with a weight update "
                          "(the client's new weights, or a WeightUpdate), or with a weight change divided by it, whose "
                          "entries times it lie on the float spacing of the model's weights; this gradient's do not"
                          f"{seen}: a FedSGD gradient needs no learning rate (a change the client computed as the "
                          "rate times its gradient: divide it by the rate and pass that as the gradient)")
    change = {k: (g.double() * learning_rate).to(g.dtype) for k, g in known.items()}
    why = (f"(divided by the learning rate given: times it, {grid.on_grid:,} of {grid.entries:,} entries small "
           f"beside their weights lie within {NEAR:g} of whole multiples of the weights' float spacing)")
    read = read_change(model, change, own, why)
    return replace(read, num_examples=grads.num_examples, error=grads.error * learning_rate,
                   learning_rate=learning_rate)


def check_kind(kind: object) -> str:
    """``kind`` if it is one of :data:`KINDS`, else :class:`UpdateError` listing them."""
    if kind not in KINDS:
        raise UpdateError(f"kind must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
    return kind


def as_tensor(value: object) -> object:
    """A numpy array (Flower's NDArrays) as a tensor of its own copy, a tensor without its autograd history
    (``torch.autograd.grad(..., create_graph=True)``'s); anything else as it is."""
    import numpy as np

    if isinstance(value, torch.Tensor):
        return value.detach()
    return torch.from_numpy(np.array(value)) if isinstance(value, np.ndarray) else value


@dataclass(frozen=True)
class WeightsEvidence:
    """What tells a dict of tensors to be a client's weights rather than a gradient, measured against the model's
    weights ``W``: ``distance`` ``||T - W|| / ||W||``; ``unchanged``, how many nonzero entries of ``W`` it holds
    bit for bit (a client's weights keep them where its data gave no gradient: inputs always 0, units that never
    fire; a gradient is 0 there); ``buffers``, the model's buffers among its entries (running statistics, which no
    gradient has)."""

    distance: float
    unchanged: int
    buffers: tuple[str, ...]

    @property
    def holds_weights(self) -> bool:
        return bool(self.buffers) or self.distance <= WEIGHTS_DISTANCE or self.unchanged >= MIN_UNCHANGED

    def said(self) -> str:
        why = [f"within {self.distance:.2g} of the model's, relative"] if self.distance <= WEIGHTS_DISTANCE else []
        if self.unchanged >= MIN_UNCHANGED:
            why.append(f"{self.unchanged:,} entries exactly the model's")
        if self.buffers:
            why.append(f"with its buffers ({', '.join(self.buffers[:3])})")
        return "; ".join(why)


def weights_evidence(model: nn.Module, tensors: Mapping[str, object]) -> WeightsEvidence | None:
    """The :class:`WeightsEvidence` of ``tensors`` over the model's floating-point entries it names with their
    shapes; ``None`` where it names none. A gradient is told on :data:`SCREEN` values spread over its largest
    entry (as far from the weights as they are from zero, none kept: a full pass over a large model's gradient
    would cost a good part of the attack); anything else on every entry."""
    own = model.state_dict()
    common = [k for k, v in tensors.items() if k in own and isinstance(v, torch.Tensor) and own[k].is_floating_point()
              and v.is_floating_point() and tuple(v.shape) == tuple(own[k].shape)]
    if not common:
        return None
    buffers = tuple(name for name, _ in model.named_buffers() if name in tensors)
    pairs = [(tensors[k].reshape(-1), own[k].reshape(-1)) for k in common]
    if not buffers:  # the screen: the largest entry, SCREEN of its values spread over it
        t, w = max(pairs, key=lambda pair: len(pair[1]))
        stride = max(1, len(w) // SCREEN)
        screen = _evidence([(t[::stride], w[::stride])], buffers)
        if screen.distance > SCREEN_DISTANCE and not screen.unchanged:
            return screen
    return _evidence(pairs, buffers)


def _evidence(pairs: list[tuple[torch.Tensor, torch.Tensor]], buffers: tuple[str, ...]) -> WeightsEvidence:
    moved = size = 0.0
    unchanged = 0
    for t, w in pairs:
        diff = t.to(w.dtype) - w
        moved += float(torch.linalg.vector_norm(diff, dtype=torch.float64)) ** 2
        size += float(torch.linalg.vector_norm(w, dtype=torch.float64)) ** 2
        unchanged += int(((diff == 0) & (w != 0)).sum())
    return WeightsEvidence(moved ** 0.5 / size ** 0.5 if size > 0 else float("inf"), unchanged, buffers)
