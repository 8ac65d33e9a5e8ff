"""A constant scale on a ``Linear`` layer's output, folded into that layer: ``self.fc2(h) / self.temperature``,
``logits * 10``, ``self.fc(x) * self.scale`` (a buffer, one number or one per unit).

``u = a z`` per unit (``a`` the product of the scales, ``1 / c`` for a division by ``c``) after ``z = W h + b`` is one
``Linear`` layer with weight ``a W`` and bias ``a b``, which the exact methods read (:mod:`fedleak.nets.dense_norms`
builds the twin; the user's model is not changed). The client's gradient turns into the twin's row by row:
``dL/d(aW)_j = (dL/dW_j) / a_j`` and ``dL/d(ab)_j = (dL/db_j) / a_j``. The scale has no parameter, so the gradient
holds nothing else to check: a gradient of another model does not reproduce through the twin, and certifies nothing.

Only constants are folded: numbers and tensors the forward reads as they are (buffers, frozen parameters). A
trainable scale (a learned temperature) is left to the frontend, which refuses it by name.
"""

from __future__ import annotations

import numbers
import operator
from dataclasses import dataclass

import torch
from torch import fx, nn

from fedleak.nets.graph_reads import op_key
from fedleak.nets.layers import BatchNorm

F64 = torch.float64

MULTIPLY = frozenset({operator.mul, operator.imul, torch.mul, ("method", "mul"), ("method", "mul_")})
DIVIDE = frozenset({operator.truediv, operator.itruediv, torch.div, ("method", "div"), ("method", "div_")})


@dataclass(frozen=True)
class ScaleFold:
    """The constant scale ``scale`` (per unit, float64) that the forward's nodes ``nodes`` put on the output of the
    ``Linear`` at module path ``linear``; ``weight``, ``bias``: its parameter names (``bias`` None without one)."""

    linear: str
    nodes: tuple[str, ...]
    scale: torch.Tensor
    weight: str
    bias: str | None

    @property
    def folded_bias(self) -> str:
        return self.bias or f"{self.linear}.bias"

    def describe(self) -> str:
        return f"the constant scale '{', '.join(self.nodes)}' on Linear '{self.linear}'"

    def folded(self) -> str:
        """How the scale is read, in words."""
        a = self.scale
        value = f"{float(a[0]):.6g}" if bool((a == a[0]).all()) else f"{float(a.min()):.4g} to {float(a.max()):.4g}"
        return f"{self.describe()} ({value}) folded into the layer (weight a W, bias a b), the gradient read as its"

    def norms(self, model: nn.Module) -> tuple[BatchNorm, ...]:
        """The norms this fold takes out of ``model``: none."""
        return ()

    def parameter_names(self) -> tuple[str | None, ...]:
        """The names of the user's parameters the twin's folded layer replaces (None: absent)."""
        return (self.weight, self.bias)

    def twin(self, lin: nn.Linear) -> nn.Linear:
        """The ``Linear`` layer that computes ``lin`` then the scale (float64 products, rounded once to its dtype)."""
        a = self.scale.to(lin.weight.device)
        out = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None, device=lin.weight.device,
                        dtype=lin.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(a[:, None] * lin.weight.detach().to(F64))
            if lin.bias is not None:
                out.bias.copy_(a * lin.bias.detach().to(F64))
        out.weight.requires_grad_(lin.weight.requires_grad)
        if lin.bias is not None:
            out.bias.requires_grad_(lin.bias.requires_grad)
        return out

    def read(self, model: nn.Module, grads: dict[str, torch.Tensor]) -> str:
        """Replace the layer's entries of ``grads`` by the twin's, in place (each row over its scale, in float64,
        rounded once); nothing to check, so the empty string."""
        for name in (self.weight, self.bias):
            if name is not None and name in grads:
                G = grads[name]
                a = self.scale.to(G.device)
                grads[name] = (G.to(F64) / (a[:, None] if G.dim() == 2 else a)).to(G.dtype)
        return ""


def _constant(arg: object, model: nn.Module) -> torch.Tensor | None:
    """``arg`` as a float64 tensor where it is a constant the forward reads as it is (a number, a buffer, a frozen
    parameter), else None."""
    if isinstance(arg, numbers.Real) and not isinstance(arg, bool):
        return torch.tensor(float(arg), dtype=F64)
    if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
        return None
    value: object = model
    for part in str(arg.target).split("."):
        value = getattr(value, part, None)
    if not isinstance(value, torch.Tensor) or value.requires_grad or not value.is_floating_point():
        return None
    return value.detach().to(F64).cpu()


def _per_unit(value: torch.Tensor, units: int) -> torch.Tensor | None:
    """``value`` as one factor per unit where it broadcasts along the features only (shape ``()``, ``(units,)`` or
    ``(1, units)``) and every factor is finite and not 0, else None."""
    if value.dim() > 2 or (value.dim() == 2 and value.shape[0] != 1) or value.numel() not in (1, units):
        return None
    out = value.reshape(-1).expand(units).clone()
    return out if bool(torch.isfinite(out).all()) and bool((out != 0).all()) else None


def _scale_of(node: fx.Node, source: fx.Node, model: nn.Module, units: int) -> torch.Tensor | None:
    """The factor per unit by which ``node`` scales ``source`` (its only tensor operand), or None."""
    key = op_key(node) if node.op in ("call_function", "call_method") else None
    if node.kwargs or len(node.args) != 2 or (key not in MULTIPLY and key not in DIVIDE):
        return None
    first, second = node.args
    if key in DIVIDE and first is not source:  # c / z is not a scale of z
        return None
    c = _constant(second if first is source else first, model)
    factor = None if c is None else _per_unit(c, units)
    return None if factor is None else (1.0 / factor if key in DIVIDE else factor)


def scaled_linears(gm: fx.GraphModule, modules: dict[str, nn.Module], calls: dict[str, int],
                   params: dict[int, str], taken: set[str]) -> list[tuple[ScaleFold, fx.Node, list[fx.Node]]]:
    """Each ``Linear`` module (called once, not in ``taken``) whose output only a chain of constant scales reads:
    its fold, its node and the chain's nodes."""
    found = []
    for node in gm.graph.nodes:
        lin = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(lin, nn.Linear) or calls[node.target] != 1 or node.target in taken:
            continue
        chain, scale, last = [], torch.ones(lin.out_features, dtype=F64), node
        while len(last.users) == 1:
            user = next(iter(last.users))
            factor = _scale_of(user, last, gm, lin.out_features)
            if factor is None:
                break
            chain.append(user)
            scale, last = scale * factor, user
        if chain:
            bias = params.get(id(lin.bias)) if lin.bias is not None else None
            fold = ScaleFold(node.target, tuple(n.name for n in chain), scale, params[id(lin.weight)], bias)
            found.append((fold, node, chain))
    return found


def has_scaled_linear(gm: fx.GraphModule) -> bool:
    """Whether ``gm``'s graph has a multiplication or division of a ``Linear`` module's output (a quick look)."""
    modules = dict(gm.named_modules())
    return any(n.op == "call_module" and isinstance(modules.get(n.target), nn.Linear)
               and any(u.op in ("call_function", "call_method") and op_key(u) in MULTIPLY | DIVIDE for u in n.users)
               for n in gm.graph.nodes)
