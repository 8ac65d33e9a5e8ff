"""Which route ``auto`` takes: whether the certified exact route applies, and which optimisation attack follows.

The exact route (the exclusivity attack, MLPs and CNNs alike) applies to a network
:func:`fedleak.nets.as_network` reads, with at least one hidden ReLU layer in its dense head, and to a FedSGD
gradient or a one-step FedAvg weight change (with biases, so that the unknown learning rate cancels in every
ratio ``ΔW_i / Δb_i``). Whether an update comes from several local steps is read by
:func:`fedleak.update_kind.describe_update`, from what the client declares. The optimisation attack for what the
exact route does not certify is looked up by update kind in :data:`OPTIMISATION_ROUTES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from fedleak.errors import FedleakError
from fedleak.nets import NO_HIDDEN_RELU, Network
from fedleak.nets.dense_norms import fold_dense_norms
from fedleak.nets.exact_view import updated_network
from fedleak.registry import Registry
from fedleak.update_kind import UpdateKind, describe_update

#: the optimisation attack that searches what the exact route leaves, by update kind
OPTIMISATION_ROUTES: Registry[str] = Registry("optimisation route")
OPTIMISATION_ROUTES.register("gradient", "ig")  # Inverting Gradients
OPTIMISATION_ROUTES.register("weights", "dlm+")  # DLM+: local steps unrolled, scale free


@dataclass(frozen=True)
class RoutePlan:
    """``auto``'s route for one (model, update): the update's kind, why the exact route is skipped (empty
    when it runs), the optimisation attack for the rest, and notes for the result."""

    kind: UpdateKind
    exact_skipped: str
    optimiser: str
    notes: tuple[str, ...] = ()

    @property
    def runs_exact(self) -> bool:
        return not self.exact_skipped


def exact_route_reason(model: nn.Module, update: Any, input_shape: tuple[int, ...] | None = None,
                       kind: UpdateKind | None = None) -> str | None:
    """``None`` when the certified exclusivity attack applies to ``(model, update)``, else why not, in words."""
    kind = kind if kind is not None else describe_update(update, model)
    if kind.multi_step:
        return (f"the client took {kind.local_steps} local steps: ΔW is no longer a scaled gradient, so no sample "
                "can be certified from it")
    net, unread = _read(model, input_shape)
    if unread:
        return unread
    fold = None if kind.is_gradient else fold_dense_norms(model)
    if fold is not None and fold.weights_unread:
        return fold.weights_unread
    if net.uncertifiable:  # no batch certifies: the budget goes to the optimisation attack
        return net.uncertifiable
    if not net.head.has_all_biases and not kind.is_gradient:
        return "the network has layers without bias, so a weight change's learning rate does not cancel row by row"
    return None


def exact_route_barrier(model: nn.Module, input_shape: tuple[int, ...] | None = None, *,
                        training: bool = False) -> str:
    """Why the exclusivity attack certifies nothing from any update of ``model``, whatever the batch, in words
    (empty where it can certify): a model it does not read, or what :func:`network_barrier` finds in the model it
    reads. An audit that would run the exclusivity attack runs ``auto`` instead, whose other attacks estimate what
    the update still shows."""
    net, unread = _read(model, input_shape)
    return unread or network_barrier(net, training=training)


def network_barrier(net: Network, *, training: bool = False) -> str:
    """Why the exclusivity attack certifies nothing from any update of the network ``net`` (as
    :func:`~fedleak.nets.as_network` read it), in words, or empty: no hidden ReLU layer, conv blocks whose outputs
    cannot determine their inputs (:attr:`~fedleak.nets.Network.uncertifiable`: max pooling, as in Flower's
    quickstart ``Net``), or, for clients that compute in training mode (``training``), Dropout or BatchNorm."""
    from fedleak.nets.network import training_mode_cause

    if net.head.depth == 0:
        return NO_HIDDEN_RELU
    if net.uncertifiable:
        return net.uncertifiable
    if training and net.mode_dependent:
        return training_mode_cause(net.dropout, net.norms)
    return ""


def _read(model: nn.Module, input_shape: tuple[int, ...] | None) -> tuple[Network | None, str]:
    """The model as the exact attack reads it, or why it does not."""
    try:
        net = updated_network(model, input_shape=input_shape)  # a frozen dense layer: not read
    except FedleakError as exc:
        return None, f"the model is not a ReLU network the exact attack reads ({exc})"
    return (None, NO_HIDDEN_RELU) if net.head.depth == 0 else (net, "")


def plan_route(model: nn.Module, update: Any, input_shape: tuple[int, ...] | None = None) -> RoutePlan:
    """The route ``auto`` takes on ``(model, update)`` (a :class:`~fedleak.GradientUpdate` or
    :class:`~fedleak.WeightUpdate`)."""
    # the one place auto reads the update's kind (declared local steps, noise, sparsification, quantisation)
    kind = describe_update(update, model)
    notes = [f"auto: {kind.summary()}"]
    skipped = exact_route_reason(model, update, input_shape, kind) or ""
    if skipped:
        notes.append(f"auto: exact route skipped: {skipped}")
    elif not kind.exact_route_possible:
        notes.append("auto: " + "; ".join(kind.evidence) + ". The exact route still runs: its certificates reject "
                     "what that changed, and what it rebuilds uncertified is where the optimisation starts")
    optimiser = OPTIMISATION_ROUTES.get("gradient" if kind.is_gradient else "weights")
    return RoutePlan(kind, skipped, optimiser, tuple(notes))
