"""The Linear layer a sample enters first, found by a probe forward pass (a module, or ``F.linear`` of the model's own
parameters), with what the model does to the sample before it, and that layer's weight and bias entries of an update:
what the first-layer attack (:mod:`fedleak.attacks.first_layer`) reads."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fedleak.attacks.masked_input import InputMasking, input_masking
from fedleak.errors import ModelError
from fedleak.forward_failure import forward_failure
from fedleak.logits_of import NotLogits
from fedleak.loose_parameters import loose_parameters
from fedleak.nets import input_shape_of
from fedleak.nets.input_map import first_layer_shape
from fedleak.nets.input_peel import peel_input_map
from fedleak.nets.layer_calls import FunctionalCalls
from fedleak.nets.ops import computed_parameter
from fedleak.nets.sample_path import changed_before
from fedleak.nets.token_inputs import TokenInputs
from fedleak.nets.weight_norm import WeightNormFold, weight_norm_folds


@dataclass(frozen=True)
class FirstLinear:
    """The Linear layer the sample enters: its module name (its weight's, for ``F.linear`` of the model's
    parameters) and the names of its weight and bias; what the model does to the sample before it in training mode
    only (``masking``), why it may read something else than the sample (``changed``:
    :func:`~fedleak.nets.sample_path.changed_before`), and the weight normalisation that computes its weight
    (``normed``, None without one: its gradient is rebuilt from ``g``'s and ``v``'s,
    :mod:`fedleak.nets.weight_norm`)."""

    name: str
    weight: str
    bias: str
    masking: InputMasking = InputMasking()
    changed: str = ""  # why the layer may not read the sample as it is (empty where the traced forward shows it does)
    normed: WeightNormFold | None = None


def first_linear(model: nn.Module, input_shape: tuple[int, ...]) -> FirstLinear:
    """The Linear layer with a bias that reads the flattened sample, runs once and shares no parameter, found by a
    probe forward pass: an ``nn.Linear`` module (its forward hooked), or ``F.linear`` of the model's own parameters
    (caught by its weight: :class:`~fedleak.nets.layer_calls.FunctionalCalls`; named by its weight's name);
    :class:`~fedleak.errors.ModelError` saying what is missing where there is none."""
    names = {id(m): n for n, m in model.named_modules()}
    held = {id(p) for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters(recurse=False)}
    loose = {id(p): n for n, p in model.named_parameters() if id(p) not in held and p.dim() == 2}
    calls: list[tuple[str, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda mod, args, out: calls.append((names[id(mod)], args[0].detach())))
             for m in model.modules() if isinstance(m, nn.Linear)]
    functional = FunctionalCalls(loose)
    first = next(model.parameters())
    probe = torch.rand((1, *input_shape), generator=torch.Generator().manual_seed(0)).to(first.device, first.dtype)
    try:
        with torch.no_grad(), functional:
            model(probe)
    except Exception as exc:  # a wrong shape fails anywhere in the user's forward (IndexError, AssertionError, ...)
        raise ModelError(f"{forward_failure(model, probe, exc)}; a model that cannot run one input cannot have sent "
                         "one sample's gradient; else pass input_shape=") from None
    finally:
        for h in hooks:
            h.remove()
    calls += [(call.weight, call.input) for call in functional.calls]
    reading = [n for n, a in calls if a.numel() == probe.numel() and torch.equal(a.reshape(-1), probe.reshape(-1))]
    if not reading:
        raise ModelError(loose_parameters(model) or "the first-layer attack needs a Linear layer that reads the sample "
                         "as it is (flattened); in this model the input passes through other layers first (a conv, a "
                         "LayerNorm, a cast to another dtype)")
    name = reading[0]
    if name in loose.values():  # F.linear of parameters: the layer is named by its weight
        return _functional_first(model, name, [c for c in functional.calls if c.weight == name], input_shape)
    module = model.get_submodule(name)
    normed = weight_norm_folds({name: module}, {id(p): n for n, p in model.named_parameters()})
    if (why := computed_parameter(module, "weight")) and not normed:
        raise ModelError(f"the Linear layer '{name}' that reads the sample: {why}; the optimisation attacks (dlg, "
                         "idlg, ig) need only autograd and still apply")
    if module.bias is None:
        raise ModelError(f"the first-layer attack needs a bias in the Linear layer '{name}' that reads the sample")
    shared = [t for t in (module.weight, module.bias)
              if sum(p is t for _, p in model.named_parameters(remove_duplicate=False)) > 1]
    if sum(n == name for n, _ in calls) > 1 or shared:
        raise ModelError(f"the Linear layer '{name}' that reads the sample runs more than once or shares its "
                         "parameters, so its gradient is not one product of the sample")
    prefix = f"{name}." if name else ""
    return FirstLinear(name, prefix + "weight", prefix + "bias", input_masking(model, module, input_shape),
                       changed_before(model, name, input_shape), normed[0] if normed else None)


def _functional_first(model: nn.Module, weight: str, calls: list, input_shape: tuple[int, ...]) -> FirstLinear:
    """:func:`first_linear` where the sample enters ``F.linear`` of the parameter ``weight`` (``calls``: its calls)."""
    bias = next((n for n, p in model.named_parameters() if p is calls[0].bias), None)
    if bias is None:
        raise ModelError(f"the first-layer attack needs a bias in the Linear layer that reads the sample: "
                         f"F.linear of '{weight}' is given {'none' if calls[0].bias is None else 'a computed one'}")
    param = model.get_parameter(weight)
    shared = [n for n in (weight, bias)
              if sum(p is model.get_parameter(n) for _, p in model.named_parameters(remove_duplicate=False)) > 1]
    if len(calls) > 1 or shared:
        raise ModelError(f"the Linear layer '{weight}' that reads the sample runs more than once or shares its "
                         "parameters, so its gradient is not one product of the sample")
    return FirstLinear(weight, weight, bias, input_masking(model, param, input_shape),
                       changed_before(model, weight, input_shape))


def first_layer_changed(model: nn.Module, input_shape: tuple[int, ...]) -> str:
    """Why the first-layer attack would not certify the sample that ``model``'s first Linear layer reads (its
    :attr:`FirstLinear.changed`, after a normalisation inside forward is peeled); empty where that layer reads the
    sample as it is, or where the attack finds no such layer (it then says why when it runs)."""
    try:
        peeled, input_map = peel_input_map(model, input_shape=input_shape)
        return first_linear(peeled, first_layer_shape(input_map, input_shape)).changed
    except ModelError:
        return ""


def _sample_shape(model: nn.Module, input_shape: tuple[int, ...] | None) -> tuple[tuple[int, ...], tuple[str, ...]]:
    if input_shape is not None:
        return tuple(int(s) for s in input_shape), ()
    try:
        return input_shape_of(model)
    except (TokenInputs, NotLogits):  # no input shape changes them
        raise
    except ModelError:
        width = next((m.in_features for m in model.modules() if isinstance(m, nn.Linear)), None)
        if width is None:
            raise ModelError(loose_parameters(model) or "the first-layer attack needs a Linear layer; this model has "
                             "none") from None
        return (width,), (f"input shape not found: read as a vector of {width} (pass input_shape=)",)


def layer_rows(model: nn.Module, tensors: dict[str, torch.Tensor], input_shape: tuple[int, ...] | None, what: str
               ) -> tuple[FirstLinear, torch.Tensor, torch.Tensor, tuple[int, ...], tuple[str, ...]]:
    """The first Linear layer, its weight and bias entries of ``tensors`` (in their dtype: a one-sample read converts
    the one row it reads), the sample's shape and notes."""
    shape, notes = _sample_shape(model, input_shape)
    layer = first_linear(model, shape)
    if layer.normed is not None:  # the weight's entry rebuilt from weight normalisation's g and v
        tensors = dict(tensors)
        if misfit := layer.normed.read(model, tensors):
            notes = (*notes, misfit)
    if layer.weight not in tensors or layer.bias not in tensors:
        raise ModelError(f"the update holds no {what} of the Linear layer '{layer.name}' that reads the sample "
                         "(frozen on the client), which is all this attack reads")
    G, g = tensors[layer.weight].detach(), tensors[layer.bias].detach()
    if G.shape[1] != math.prod(shape):
        raise ModelError(f"the Linear layer '{layer.name}' reads {G.shape[1]} values, not one input of shape {shape}")
    return layer, G, g, shape, notes
