"""The model the audit attacks, checked once when the strategy is built rather than once per client update.

:class:`~fedleak.federation.strategy.AuditFedAvg` accepts any ``nn.Module`` (Flower's quickstart ``Net``,
your own class). :func:`audit_template` turns it into the template that each round's sent weights are
loaded into:

* the model traced with ``torch.fx``: a ``GraphModule`` whose ``forward`` is generated code and whose
  submodules are torch's own (``nn.Conv2d``, ``nn.Linear``, ...), under the user's names (``conv1.weight``),
  so Flower's state dicts load into it and it pickles without the user's class -- the audit worker process
  can rebuild it even when the class lives in the script being run (``__main__``), which it never imports;
* when the attack needs a ReLU network fedleak can read (the exact attacks), the model is read with
  :func:`fedleak.nets.as_network` first, so an unsupported model fails here with a
  :class:`~fedleak.errors.ModelError` naming the node;
* a model that ``torch.fx`` cannot trace is still fine for the optimisation attacks: the template is then a
  plain copy, and (worker process only) it must be picklable and importable, checked here;
* the template travels to the worker process as :class:`Shipped`: torch pickles no layer under weight normalisation
  (a parametrized module), so those travel as plain layers and are normalised again on arrival.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Sequence
from dataclasses import dataclass

from torch import fx, nn

from fedleak.errors import FedleakError, ModelError
from fedleak.model_copy import copy_model
from fedleak.nets.tracing import keep_every_tensor, trace_model, traced_shape
from fedleak.nets.weight_norm import NormedLayer, with_weight_norm, without_weight_norm

__all__ = ["Shipped", "audit_template", "check_shippable", "shipped", "traced_copy"]


@dataclass(frozen=True)
class Shipped:
    """A template as it travels to the audit worker process: ``model`` with its ``normed`` layers out of their weight
    normalisation (torch pickles no parametrized module), put back by :meth:`arrived`."""

    model: nn.Module
    normed: tuple[NormedLayer, ...] = ()

    def arrived(self) -> nn.Module:
        """The template as it was sent."""
        return with_weight_norm(self.model, self.normed)


def shipped(template: nn.Module) -> Shipped:
    """``template`` ready to travel (a copy: the template itself is not changed)."""
    model = copy_model(template)
    return Shipped(model, without_weight_norm(model))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def traced_copy(model: nn.Module) -> fx.GraphModule:
    """``model`` traced with ``torch.fx`` (its own weights, not shared), with every entry of its state dict.

    Tracing keeps only what ``forward`` reads; parameters and buffers it never reads are put back, so that
    the state dicts a federation sends (all of the model's) load into the copy. The model's ``input_shape``
    (set by fedleak's builders) is kept too. Traced as the exact methods trace it
    (:func:`~fedleak.nets.tracing.trace_model`: ``len(x)``, inputs with defaults); raises its
    :class:`~fedleak.errors.ModelError` for an untraceable model.
    """
    own = copy_model(model).cpu()
    gm = trace_model(own)
    # under ``from __future__ import annotations`` the forward's type hints are strings, which torch.fx
    # keeps as globals of the generated code and then cannot pickle; they are only hints, so drop them
    if any(isinstance(node.type, str) for node in gm.graph.nodes):
        for node in gm.graph.nodes:
            if isinstance(node.type, str):
                node.type = None
        gm.recompile()
    keep_every_tensor(gm, own)
    shape = getattr(model, "input_shape", None) or traced_shape(gm)  # a forward reading its shape: the one traced
    if shape is not None:
        gm.input_shape = tuple(shape)
    return gm  # submodules are the copy's own, in their own mode (eval-mode Dropout stays in eval)


class _WorkerUnpickler(pickle.Unpickler):
    """Unpickles as the audit worker does: the worker never imports the running script (``__main__``)."""

    def find_class(self, module: str, name: str):
        if module == "__main__":
            raise FedleakError(f"'{name}' is defined in the script being run (__main__), which the worker does "
                               "not import")
        return super().find_class(module, name)


def check_shippable(obj: object, what: str) -> None:
    """Raise :class:`FedleakError` unless ``obj`` survives the trip to the audit worker process (pickled here,
    unpickled there without ``__main__``); the message starts with ``what``."""
    try:
        data = pickle.dumps(obj)
    except Exception as err:  # noqa: BLE001 - PicklingError, AttributeError (local class), TypeError, ...
        why = f"it cannot be pickled ({_first_line(err)})"
    else:
        try:
            _WorkerUnpickler(io.BytesIO(data)).load()
            return
        except FedleakError as err:
            why = str(err)
        except Exception as err:  # noqa: BLE001 - whatever a reduce function raises
            why = f"it cannot be unpickled ({_first_line(err)})"
    raise FedleakError(f"{what} cannot be sent to the audit worker process (audit_mode='process'): {why}")


def audit_template(model: nn.Module, *, attack: str, needs_relu_network: bool, process: bool,
                   input_shape: Sequence[int] | None = None) -> nn.Module:
    """The module the audit loads each round's sent weights into (see the module docstring).

    ``needs_relu_network``: the attack is an exact one; the model must then be one
    :func:`fedleak.nets.as_network` reads (else :class:`ModelError`, naming the node). ``process``: the
    template goes to the worker process, so it must pickle without ``__main__`` (else :class:`FedleakError`).
    """
    if needs_relu_network:
        from fedleak.binary import as_two_class
        from fedleak.nets.exact_view import exact_network

        try:  # one logit: the attacks read its two-class twin (fedleak.reconstruct does)
            exact_network(as_two_class(model)[0], input_shape=input_shape)
        except ModelError as err:
            raise ModelError(f"the '{attack}' attack cannot run on this model: {_first_line(err)}") from None
    try:
        traced: nn.Module | None = traced_copy(model)
        why_not = ""
    except Exception as err:  # noqa: BLE001 - torch.fx raises TraceError, TypeError, NotImplementedError, ...
        traced, why_not = None, f"torch.fx could not trace it ({_first_line(err)})"
    if not process:
        return traced if traced is not None else copy_model(model).cpu()
    if traced is not None:
        try:
            check_shippable(shipped(traced), "the traced model")
            return traced
        except FedleakError as err:
            why_not = f"its torch.fx trace cannot be sent either ({err})"
    plain = copy_model(model).cpu()
    try:
        check_shippable(shipped(plain), f"the model ({type(model).__name__})")
    except FedleakError as err:
        raise FedleakError(f"{err}; {why_not}; define the model class in an importable module, or use "
                           "audit_mode='thread'") from None
    return plain
