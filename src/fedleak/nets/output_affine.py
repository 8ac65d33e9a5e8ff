"""Constant arithmetic on a ``Linear`` layer's output, folded into that layer: logits divided by a temperature
(``self.fc2(h) / self.T``), a fixed gain (``logits * 10``), a per-class shift (``logits + self.log_prior``, the logit
adjustment of long-tail and label-skewed federated training), or a chain of them.

``u = a z + c`` per unit (``a``, ``c`` the chain's product and sum, a division by ``k`` a factor ``1 / k``) after ``z =
W h + b`` is one ``Linear`` layer with weight ``a W`` and bias ``a b + c``, which the exact methods read
(:mod:`fedleak.nets.dense_norms` builds the twin; the user's model is not changed). The client's gradient turns into
the twin's row by row: ``dL/d(aW)_j = (dL/dW_j) / a_j`` and ``dL/d(ab + c)_j = (dL/db_j) / a_j``; so does a one-step
weight change, the learning rate times the gradient (the twin's change at the same rate). The arithmetic has
no parameter, so the gradient holds nothing else to check: a gradient of another model does not reproduce through the
twin, and certifies nothing.

Only constants are folded: numbers and tensors the forward reads as they are (buffers, frozen parameters), each one
value or one per unit; a shift needs the layer's bias (the twin's bias carries it). A trainable scale (a learned
temperature) is left to the frontend, which refuses it by name.
"""

from __future__ import annotations

import numbers
import operator
from dataclasses import dataclass

import torch
from torch import fx, nn

from fedleak.nets.graph_reads import op_key
from fedleak.nets.layers import BatchNorm
from fedleak.nets.norm_fold import ScaledRows, linear_twin

F64 = torch.float64

MULTIPLY = frozenset({operator.mul, operator.imul, torch.mul, ("method", "mul"), ("method", "mul_")})
DIVIDE = frozenset({operator.truediv, operator.itruediv, torch.div, ("method", "div"), ("method", "div_")})
ADD = frozenset({operator.add, operator.iadd, torch.add, ("method", "add"), ("method", "add_")})
SUBTRACT = frozenset({operator.sub, operator.isub, torch.sub, ("method", "sub"), ("method", "sub_")})
ARITHMETIC = MULTIPLY | DIVIDE | ADD | SUBTRACT


@dataclass(frozen=True)
class AffineFold(ScaledRows):
    """The constant map ``u = scale z + shift`` (per unit, float64) that the forward's nodes ``nodes`` put on the
    output of the ``Linear`` at module path ``linear``; ``weight``, ``bias``: its parameter names (``bias`` None
    without one, and then ``shift`` is zero)."""

    linear: str
    nodes: tuple[str, ...]
    scale: torch.Tensor
    shift: torch.Tensor
    weight: str
    bias: str | None

    @property
    def folded_bias(self) -> str:
        return self.bias or f"{self.linear}.bias"

    def describe(self) -> str:
        return f"the constant arithmetic '{', '.join(self.nodes)}' on Linear '{self.linear}'"

    def folded(self) -> str:
        """How the arithmetic is read, in words."""
        return (f"{self.describe()} (a scale of {_values(self.scale)}, a shift of {_values(self.shift)}) folded into "
                "the layer (weight a W, bias a b + c), the update (a gradient, or one step's change) read as its")

    def norms(self, model: nn.Module) -> tuple[BatchNorm, ...]:
        """The norms this fold takes out of ``model``: none."""
        return ()

    def parameter_names(self) -> tuple[str | None, ...]:
        """The names of the user's parameters the twin's folded layer replaces (None: absent)."""
        return (self.weight, self.bias)

    def twin(self, lin: nn.Linear) -> nn.Linear:
        """The ``Linear`` layer that computes ``lin`` then the map (float64 products, rounded once to its dtype)."""
        a, c = self.scale.to(lin.weight.device), self.shift.to(lin.weight.device)
        bias = None if lin.bias is None else a * lin.bias.detach().to(F64) + c
        return linear_twin(lin, a[:, None] * lin.weight.detach().to(F64), bias)

    def read(self, model: nn.Module, grads: dict[str, torch.Tensor]) -> str:
        """Replace the layer's entries of ``grads`` by the twin's, in place (each row over its scale, in float64,
        rounded once); nothing to check, so the empty string."""
        for name in (self.weight, self.bias):
            if name is not None and name in grads:
                G = grads[name]
                a = self.scale.to(G.device)
                grads[name] = (G.to(F64) / (a[:, None] if G.dim() == 2 else a)).to(G.dtype)
        return ""


def _values(t: torch.Tensor) -> str:
    return f"{float(t[0]):.6g}" if bool((t == t[0]).all()) else f"{float(t.min()):.4g} to {float(t.max()):.4g}"


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
    """``value`` as one number per unit where it broadcasts along the features only (shape ``()``, ``(units,)`` or
    ``(1, units)``) and every number is finite, else None."""
    if value.dim() > 2 or (value.dim() == 2 and value.shape[0] != 1) or value.numel() not in (1, units):
        return None
    out = value.reshape(-1).expand(units).clone()
    return out if bool(torch.isfinite(out).all()) else None


def _step(node: fx.Node, source: fx.Node, model: nn.Module, units: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(factor, offset)`` per unit with ``node = factor * source + offset`` (``source`` its only tensor operand), or
    None where ``node`` is no such map (a factor of 0 included)."""
    key = op_key(node) if node.op in ("call_function", "call_method") else None
    if node.kwargs or len(node.args) != 2 or key not in ARITHMETIC:
        return None
    first, second = node.args
    if key in DIVIDE and first is not source:  # k / z is not affine in z
        return None
    value = _constant(second if first is source else first, model)
    c = None if value is None else _per_unit(value, units)
    if c is None:
        return None
    one, zero = torch.ones(units, dtype=F64), torch.zeros(units, dtype=F64)
    if key in MULTIPLY or key in DIVIDE:
        factor = c if key in MULTIPLY else 1.0 / c
        return (factor, zero) if bool((factor != 0).all()) and bool(torch.isfinite(factor).all()) else None
    if key in ADD:
        return one, c
    return (one, -c) if first is source else (-one, c)  # z - c, or c - z


def affine_outputs(gm: fx.GraphModule, modules: dict[str, nn.Module], calls: dict[str, int], params: dict[int, str],
                   taken: set[str]) -> list[tuple[AffineFold, fx.Node, list[fx.Node]]]:
    """Each ``Linear`` module (called once, not in ``taken``) whose output only a chain of constant maps reads (a
    shift only where the layer has a bias): its fold, its node and the chain's nodes."""
    found = []
    for node in gm.graph.nodes:
        lin = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(lin, nn.Linear) or calls[node.target] != 1 or node.target in taken:
            continue
        units = lin.out_features
        chain, scale, shift, last = [], torch.ones(units, dtype=F64), torch.zeros(units, dtype=F64), node
        while len(last.users) == 1:
            user = next(iter(last.users))
            step = _step(user, last, gm, units)
            if step is None or (lin.bias is None and bool((step[1] != 0).any())):
                break
            chain.append(user)
            scale, shift, last = scale * step[0], shift * step[0] + step[1], user
        if chain:
            bias = params.get(id(lin.bias)) if lin.bias is not None else None
            fold = AffineFold(node.target, tuple(n.name for n in chain), scale, shift, params[id(lin.weight)], bias)
            found.append((fold, node, chain))
    return found


def has_output_arithmetic(gm: fx.GraphModule) -> bool:
    """Whether ``gm``'s graph does arithmetic on a ``Linear`` module's output (a quick look)."""
    modules = dict(gm.named_modules())
    return any(n.op == "call_module" and isinstance(modules.get(n.target), nn.Linear)
               and any(u.op in ("call_function", "call_method") and op_key(u) in ARITHMETIC for u in n.users)
               for n in gm.graph.nodes)
