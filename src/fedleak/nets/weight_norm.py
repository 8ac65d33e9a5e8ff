"""A layer whose weight torch's weight normalisation computes, read as the plain layer with that weight.

``torch.nn.utils.parametrizations.weight_norm`` (and the older ``torch.nn.utils.weight_norm`` hook) compute a layer's
weight as ``w_r = g_r v_r / ||v_r||`` for each slice ``r`` of ``v`` along ``dim`` (0: each output unit or channel;
``dim=None``: the whole tensor, one ``g``). A client's update holds ``g``'s and ``v``'s gradients. With ``G_r`` the
weight's gradient, ``N_r = ||v_r||`` and ``u_r = v_r / N_r``::

    dL/dg_r = u_r . G_r,        dL/dv_r = (g_r / N_r) (G_r - u_r (u_r . G_r)),

so the weight's gradient comes back whole: ``G_r = (N_r / g_r) dL/dv_r + (dL/dg_r) u_r``; so does a one-step
weight change, the learning rate times each. The exact methods read the twin, the layer without the normalisation
whose weight is the one it computes (:meth:`WeightNormFold.twin`; :mod:`fedleak.nets.dense_norms` builds the twin of
the model, whose layers are otherwise the user's; the user's model is not changed). ``v``'s gradient is orthogonal to
``v`` in every slice (SGD's weight decay, or an L2 penalty, adds the same multiple of ``v`` to every slice's); where it
is not, the update is not this model's gradient (a client that trained without the normalisation, noise added to it,
several local steps): it does not fit, and nothing is certified.

The bound on the rebuilt gradient's rounding (the client's float32 arithmetic through the normalisation, and a
change's own rounding carried through) is the exact attack's (:mod:`fedleak.attacks.exact.weight_norm_bound`).

Two forms are registered (:data:`WEIGHT_NORM_FORMS`); a spectral norm is not read (``w = v / sigma(v)``: its
gradient keeps no component along ``v`` itself, so the weight's gradient cannot be rebuilt from it).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize
from torch.nn.utils.parametrizations import _WeightNorm

from fedleak.errors import ModelError
from fedleak.registry import Registry

F64 = torch.float64

# the old hook's class (its module shares the function's name, so it is read from the module's namespace)
_HOOK = __import__("torch.nn.utils.weight_norm", fromlist=["WeightNorm"]).WeightNorm


@dataclass(frozen=True)
class FormRead:
    """What one form of weight normalisation holds in a module: the attribute paths of ``g`` and ``v`` (relative to
    the module), the slices' ``dim`` (-1: the whole tensor), the module's class without it (``plain``), and
    ``drops(name, value)``: whether the twin leaves out the module's entry ``name`` (a submodule or a hook)."""

    g: str
    v: str
    dim: int
    plain: type[nn.Module]
    drops: Callable[[str, object], bool]


@dataclass(frozen=True)
class WeightNormForm:
    """One form of weight normalisation: ``read`` tells what it holds in a module (None where the module has none of
    this form), ``apply`` puts it on a plain module's ``weight`` over slices along ``dim`` (-1: the whole tensor)."""

    read: Callable[[nn.Module], FormRead | None]
    apply: Callable[[nn.Module, int], nn.Module]


WEIGHT_NORM_FORMS: Registry[WeightNormForm] = Registry("weight normalisation form")


def _apply_parametrization(module: nn.Module, dim: int) -> nn.Module:
    return parametrizations.weight_norm(module, dim=dim)


def _apply_hook(module: nn.Module, dim: int) -> nn.Module:
    with warnings.catch_warnings():  # deprecated by torch: applied where a user's model had it
        warnings.simplefilter("ignore", FutureWarning)
        return torch.nn.utils.weight_norm(module, dim=dim)


def _parametrized(module: nn.Module) -> FormRead | None:
    """``torch.nn.utils.parametrizations.weight_norm``: one ``_WeightNorm`` on ``weight``, nothing else parametrized."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    chain = module.parametrizations["weight"]
    if len(module.parametrizations) != 1 or len(chain) != 1 or not isinstance(chain[0], _WeightNorm):
        return None
    return FormRead("parametrizations.weight.original0", "parametrizations.weight.original1", int(chain[0].dim),
                    parametrize.type_before_parametrizations(module), _parametrization_part)


def _parametrization_part(name: str, value: object) -> bool:
    """Whether a module's entry is part of ``parametrizations.weight_norm``: its parametrizations, and the hook it
    registers to load state dicts of the older form (a local function, which does not pickle)."""
    return name == "parametrizations" or getattr(getattr(value, "hook", None), "__name__", "") == COMPAT_HOOK


#: the name of the load-state-dict hook ``parametrizations.weight_norm`` registers
COMPAT_HOOK = "_weight_norm_compat_hook"


def _hooked(module: nn.Module) -> FormRead | None:
    """``torch.nn.utils.weight_norm`` (deprecated): a forward pre-hook that sets ``weight`` from ``weight_g`` and
    ``weight_v`` before each call."""
    hooks = [h for h in module._forward_pre_hooks.values() if isinstance(h, _HOOK) and h.name == "weight"]
    if len(hooks) != 1:
        return None
    return FormRead("weight_g", "weight_v", int(hooks[0].dim), type(module),
                    lambda _, value: isinstance(value, _HOOK))


WEIGHT_NORM_FORMS.register("parametrization", WeightNormForm(_parametrized, _apply_parametrization))
WEIGHT_NORM_FORMS.register("hook", WeightNormForm(_hooked, _apply_hook))


def read_form(module: nn.Module) -> tuple[str, FormRead] | None:
    """The form of weight normalisation ``module`` computes its weight with, and what it holds; None without one."""
    for name, form in WEIGHT_NORM_FORMS.items():
        if (read := form.read(module)) is not None:
            return name, read
    return None


def _plain(module: nn.Module, read: FormRead, weight: nn.Parameter) -> nn.Module:
    """``module`` without its weight normalisation (``read``): a module of its class before it, sharing every other
    tensor and setting of it, with ``weight``."""
    plain = read.plain.__new__(read.plain)
    state = dict(module.__dict__)
    local = {read.g.rsplit(".", 1)[-1], read.v.rsplit(".", 1)[-1]}
    state["_parameters"] = {k: p for k, p in module._parameters.items() if k not in local}
    state["_modules"] = {k: m for k, m in module._modules.items() if not read.drops(k, m)}
    for hooks in ("_forward_pre_hooks", "_load_state_dict_pre_hooks"):
        held = getattr(module, hooks)
        state[hooks] = type(held)((k, h) for k, h in held.items() if not read.drops(str(k), h))
    plain.__dict__.update(state)
    for name in ("weight_g", "weight_v", "weight"):  # the old hook's copies of its tensors, left as plain attributes
        plain.__dict__.pop(name, None)
    plain.weight = weight
    return plain


@dataclass(frozen=True)
class WeightNormFold:
    """The layer at module path ``layer`` whose weight weight normalisation (form ``form``) computes from ``g`` and
    ``v`` (their names in ``model.named_parameters()``) over slices along ``dim`` (-1: the whole tensor)."""

    layer: str
    form: str
    g: str
    v: str
    dim: int

    @property
    def weight(self) -> str:
        """The twin's weight's name."""
        return f"{self.layer}.weight"

    def describe(self) -> str:
        return f"weight normalisation on '{self.layer}'"

    def folded(self) -> str:
        """How the layer is read, in words."""
        return (f"{self.describe()} read as the layer with the weight it computes, g v / ||v||, the weight's gradient "
                "rebuilt from g's and v's")

    def parameter_names(self) -> tuple[str, str]:
        """The names of the user's parameters the twin's weight replaces."""
        return self.g, self.v

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (shaped as ``v``) as one row per slice."""
        return t.reshape(1, -1) if self.dim == -1 else t.movedim(self.dim, 0).reshape(t.shape[self.dim], -1)

    def unrows(self, rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Rows (:meth:`rows`) back in the shape of ``v``."""
        if self.dim == -1:
            return rows.reshape(shape)
        moved = (shape[self.dim], *(s for i, s in enumerate(shape) if i != self.dim))
        return rows.reshape(moved).movedim(0, self.dim)

    def factors(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``N / g`` per slice, ``u = v / N`` as rows (:meth:`rows`), and ``N`` (float64), from ``model``'s tensors."""
        v, g = model.get_parameter(self.v).detach(), model.get_parameter(self.g).detach()
        V = self.rows(v).to(F64)
        norm = V.norm(dim=1)
        return norm / g.to(F64).reshape(-1), V / norm[:, None].clamp_min(1e-300), norm

    def decay_direction(self, model: nn.Module) -> torch.Tensor:
        """What SGD's weight decay adds to the rebuilt weight's one-step change, up to its factor ``lr * lambda``:
        the decay of ``g`` and ``v`` (``lambda g``, ``lambda v``) rebuilt as their gradients are, ``(N_r / g_r) v_r +
        g_r u_r = (1 + N_r^2 / g_r^2) w_r`` per slice (shaped as ``v``, in its dtype), from ``model``'s tensors."""
        gain, u, norm = self.factors(model)
        v = model.get_parameter(self.v)
        rows = ((1 + gain * gain) * norm / gain)[:, None] * u
        return self.unrows(rows, v.shape).to(device=v.device, dtype=v.dtype)

    def twin(self, module: nn.Module) -> nn.Module:
        """``module`` without the normalisation: a module of its class before it, sharing every other tensor of it,
        whose weight is the one the normalisation computes (a parameter, trained where ``g`` and ``v`` both are)."""
        _, read = read_form(module)
        v, g = _attribute(module, read.v), _attribute(module, read.g)
        with torch.no_grad():
            weight = torch._weight_norm(v, g, read.dim)
        return _plain(module, read, nn.Parameter(weight.detach().clone(),
                                                 requires_grad=v.requires_grad and g.requires_grad))

    def read(self, model: nn.Module, grads: dict[str, torch.Tensor], noise: torch.Tensor | None = None) -> str:
        """Replace ``g``'s and ``v``'s entries of ``grads`` by the twin weight's, in place (in float64, rounded once to
        the update's dtype); how the update misses the normalisation's identity (empty where it does not). ``noise``:
        each entry of ``v``'s by up to how much the update's own rounding moves it (a one-step change's), which the
        identity allows for."""
        if self.v not in grads or self.g not in grads:  # a frozen layer sends none: the frontend's check says so
            grads.pop(self.v, None)
            grads.pop(self.g, None)
            return ""
        dv, dg = grads.pop(self.v), grads.pop(self.g)
        gain, u, norm = (t.to(dv.device) for t in self.factors(model))
        dV = self.rows(dv).to(F64)
        G = gain[:, None] * dV + dg.to(F64).reshape(-1)[:, None] * u
        grads[self.weight] = self.unrows(G, dv.shape).to(dv.dtype)
        # v . dL/dv_r is 0, or, with SGD's weight decay (an L2 penalty), the same multiple k N_r^2 in every slice
        along = torch.linalg.vecdot(u, dV) * norm
        common = float((along / (norm * norm).clamp_min(1e-300)).median())
        off = (along - common * norm * norm).abs()
        size = torch.linalg.vecdot(u.abs(), dV.abs()) * norm + abs(common) * norm * norm
        if noise is not None:
            off = (off - torch.linalg.vecdot(u.abs(), self.rows(noise.to(F64))) * norm).clamp_min(0.0)
        if bool((off > ALONG_TOL * (size + size.mean()) + 1e-30).any()):
            worst = float((off / (size + size.mean() + 1e-30)).max())
            return (f"{self.describe()}: v's gradient along v is not the same multiple of v in every slice (off by "
                    f"up to {worst:.1e} of its terms), as the normalisation makes it (zero, or a weight decay's)")
        return ""


# the client's float32 arithmetic leaves v . dL/dv at most about n eps of its terms off (n a slice's size); this is far
# above that for any layer, and far below the share of a gradient of another model or of one with noise added
ALONG_TOL = 1e-3


def _attribute(module: nn.Module, path: str) -> torch.Tensor:
    value: object = module
    for part in path.split("."):
        value = getattr(value, part)
    return value  # type: ignore[return-value]


def weight_norm_folds(named: dict[str, nn.Module], params: dict[int, str]) -> tuple[WeightNormFold, ...]:
    """A fold for each module of ``named`` (paths to modules) whose weight weight normalisation computes
    (``params``: the model's parameter names by ``id``)."""
    folds = []
    for path, module in named.items():
        found = read_form(module)
        if found is None:
            continue
        form, read = found
        g, v = _attribute(module, read.g), _attribute(module, read.v)
        folds.append(WeightNormFold(path, form, params[id(g)], params[id(v)], read.dim))
    return tuple(folds)


def has_weight_norm(model: nn.Module) -> bool:
    """Whether any module of ``model`` computes its weight by weight normalisation."""
    return any(read_form(m) is not None for m in model.modules())


@dataclass(frozen=True)
class NormedLayer:
    """A layer taken out of its weight normalisation to travel (torch pickles no parametrized module): its module
    path, form, ``dim``, and its ``g`` (the plain layer's weight holds ``v``)."""

    path: str
    form: str
    dim: int
    g: torch.Tensor
    g_trained: bool


def without_weight_norm(model: nn.Module) -> tuple[NormedLayer, ...]:
    """Take every layer of ``model`` out of its weight normalisation, in place: each becomes the plain layer whose
    weight is ``v`` (the same parameter); what :func:`with_weight_norm` puts back."""
    taken = []
    for path, module in list(model.named_modules()):
        found = read_form(module)
        if found is None:
            continue
        form, read = found
        g, v = _attribute(module, read.g), _attribute(module, read.v)
        parent, _, name = path.rpartition(".")
        model.get_submodule(parent).register_module(name, _plain(module, read, v))
        taken.append(NormedLayer(path, form, read.dim, g.detach().clone(), g.requires_grad))
    return tuple(taken)


def with_weight_norm(model: nn.Module, layers: tuple[NormedLayer, ...]) -> nn.Module:
    """``model`` with ``layers`` (:func:`without_weight_norm`) normalised again, in place, their ``g`` and ``v`` as
    they were; returns ``model``."""
    for layer in layers:
        parent, _, name = layer.path.rpartition(".")
        module = model.get_submodule(layer.path)
        trained = module.weight.requires_grad
        normed = WEIGHT_NORM_FORMS.get(layer.form).apply(module, layer.dim)
        _, read = read_form(normed)
        with torch.no_grad():
            _attribute(normed, read.g).copy_(layer.g)
        _attribute(normed, read.g).requires_grad_(layer.g_trained)
        _attribute(normed, read.v).requires_grad_(trained)
        model.get_submodule(parent).register_module(name, normed)
    return model


def check_apart(normed: tuple[WeightNormFold, ...], folded: list[str], first: nn.Module | None,
                modules: dict[str, nn.Module]) -> None:
    """Refuse a layer with weight normalisation that another fold reads too (a norm, constant arithmetic or a change
    of layout at module paths ``folded``; ``first``: the layer that reads a norm on the model's input): its rebuilt
    gradient's bound is not carried through the second fold."""
    both = sorted({f.layer for f in normed} & (set(folded) | {t for t, m in modules.items() if m is first}))
    if both:
        raise ModelError(f"'{both[0]}' has weight normalisation and a BatchNorm1d, constant arithmetic or a change "
                         "of layout folded into it, which the exact methods do not read together (remove the "
                         "normalisation before training, torch.nn.utils.parametrize.remove_parametrizations, or fold "
                         "the norm into the layer); 'first-layer', 'auto' and the optimisation attacks still apply")
