"""An eval-mode ``BatchNorm1d`` after a ReLU, on the features a ``Linear`` layer reads, folded into that layer.

``Linear -> ReLU -> BatchNorm1d -> Linear`` (with an eval-mode ``Dropout`` anywhere after the norm, as tabular MLPs
are written) computes, in eval mode, ``u = a h + c`` per unit (``a = gamma / sqrt(var + eps)``, ``c = beta - a
mean``: its running statistics) and then ``z = W u + b``: one ``Linear`` layer on the ReLU's output ``h`` with weight
``W diag(a)`` and bias ``W c + b``. The exact methods read that twin (:mod:`fedleak.nets.dense_norms` builds it); the
client's gradient turns into the twin's:

- the folded bias's gradient is the ``Linear``'s, ``dL/db' = dL/db = g`` (summed over the batch);
- the folded weight's is ``dL/dW' = (dL/dW - g c^T) diag(1/a)``, since ``dL/dW = sum g u^T = dL/dW' diag(a) + g c^T``;
- ``beta``'s and ``gamma``'s add nothing about the batch, and are checked: in eval mode ``dL/dbeta = W^T g`` and
  ``dL/dgamma_j = (sum_i W_ij dL/dW'_ij - mean_j dL/dbeta_j) / sqrt(var_j + eps)``; a client that ran the norm in
  training mode does not meet them, and nothing is certified.

The ``Linear`` after the norm needs a bias (its gradient is ``g``, which the fold subtracts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from fedleak.nets.converters import relu
from fedleak.nets.frontend import converter_key
from fedleak.nets.input_norm import missed, trainable_name
from fedleak.nets.layers import BatchNorm
from fedleak.nets.norm_fold import ScaledRows, linear_twin, norm_affine
from fedleak.nets.ops import CONVERTERS

F64 = torch.float64


@dataclass(frozen=True)
class ReluNormFold(ScaledRows):
    """An eval-mode ``BatchNorm1d`` (module path ``norm``) after a ReLU, folded into the ``Linear`` (``linear``) that
    reads its output: ``scale``, ``shift`` are its ``a`` and ``c``, ``mean`` and ``std`` its running mean and
    ``sqrt(var + eps)`` (float64); ``weight``, ``bias`` the ``Linear``'s parameter names, ``gamma``, ``beta`` the
    norm's (None where it has none)."""

    linear: str
    norm: str
    scale: torch.Tensor
    shift: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    weight: str
    bias: str
    gamma: str | None
    beta: str | None

    @property
    def folded_bias(self) -> str:
        return self.bias

    def describe(self) -> str:
        return f"BatchNorm1d '{self.norm}' after a ReLU, before Linear '{self.linear}'"

    def folded(self) -> str:
        """How the norm is read, in words."""
        return (f"{self.describe()} folded into that layer (weight W diag(a), bias W c + b, from the norm's running "
                "statistics), the gradient read as that layer's")

    def norms(self, model: nn.Module) -> tuple[BatchNorm, ...]:
        """The norm this fold takes out of ``model``."""
        return (BatchNorm(self.norm, model.get_submodule(self.norm), self.gamma, self.beta),)

    def parameter_names(self) -> tuple[str | None, ...]:
        """The names of the user's parameters the twin's folded layer replaces (None: absent)."""
        return (self.weight, self.bias, self.gamma, self.beta)

    def twin(self, lin: nn.Linear) -> nn.Linear:
        """The ``Linear`` layer that computes the norm then ``lin`` (float64 products, rounded once to its dtype)."""
        W = lin.weight.detach().to(F64)
        scale, shift = self.scale.to(W.device), self.shift.to(W.device)
        return linear_twin(lin, W * scale[None, :], W @ shift + lin.bias.detach().to(F64), lin.bias.requires_grad)

    def read(self, model: nn.Module, grads: dict[str, torch.Tensor]) -> str:
        """Replace the ``Linear``'s and the norm's entries of ``grads`` by the folded layer's, in place; returns how
        the gradient misses eval mode's identities (empty where it does not)."""
        g_gamma = grads.pop(self.gamma, None) if self.gamma is not None else None
        g_beta = grads.pop(self.beta, None) if self.beta is not None else None
        if self.weight not in grads or self.bias not in grads:  # a frozen layer: the frontend's check says so
            return ""
        G, g = grads[self.weight], grads[self.bias]
        a, c = self.scale.to(G.device), self.shift.to(G.device)
        Gf = (G.to(F64) - g.to(F64)[:, None] * c[None, :]) / a[None, :]  # in float64, rounded once
        grads[self.weight] = Gf.to(G.dtype)
        W = model.get_submodule(self.linear).weight.detach().to(device=G.device, dtype=F64)
        misses: list[str] = []
        if g_beta is not None:
            expected = W.T @ g.to(F64)
            off = (g_beta.to(F64) - expected).abs()
            if missed(off, (W.abs().T @ g.to(F64).abs()) + g_beta.to(F64).abs()):
                misses.append(f"{self.describe()}: beta's gradient is not W^T times the Linear bias's")
        if g_gamma is not None and g_beta is not None:
            std, mean = self.std.to(G.device), self.mean.to(G.device)
            expected = ((W * Gf).sum(0) - mean * g_beta.to(F64)) / std
            magnitude = ((W * Gf).abs().sum(0) + (mean * g_beta.to(F64)).abs()) / std
            off = (g_gamma.to(F64) - expected).abs()
            if missed(off, magnitude + g_gamma.to(F64).abs()):
                misses.append(f"{self.describe()}: gamma's gradient is not the one eval mode fixes it to")
        return "; ".join(misses)


def relu_norm_pairs(gm: fx.GraphModule, modules: dict[str, nn.Module], calls: dict[str, int]
                    ) -> list[tuple[fx.Node, fx.Node]]:
    """Each eval-mode ``BatchNorm1d`` node (with running statistics, called once) that reads a ReLU's output and
    whose output only a ``Linear`` layer (called once, with a bias) reads, through eval-mode ``Dropout`` at most:
    ``(norm node, linear node)``."""
    pairs = []
    for node in gm.graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, nn.BatchNorm1d) or bn.running_mean is None or calls.get(node.target) != 1:
            continue
        if len(node.args) != 1 or node.kwargs or not _is_relu(node.args[0], modules):
            continue
        user = node
        while len(user.users) == 1:
            user = next(iter(user.users))
            module = modules.get(user.target) if user.op == "call_module" else None
            if not isinstance(module, nn.Dropout):
                break
        if (user is not node and user.op == "call_module" and isinstance(modules.get(user.target), nn.Linear)
                and calls.get(user.target) == 1 and modules[user.target].bias is not None):
            pairs.append((node, user))
    return pairs


def _is_relu(node: object, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` computes a ReLU: its converter is the ReLU's (``nn.ReLU``, ``F.relu``, ``x.relu_()``...)."""
    if not isinstance(node, fx.Node) or node.op not in ("call_module", "call_function", "call_method"):
        return False
    key = converter_key(node, modules.get(node.target) if node.op == "call_module" else None)
    return key is not None and CONVERTERS.get(key) is relu


def relu_norm_fold(norm: str, linear: str, bn: nn.BatchNorm1d, lin: nn.Linear,
                   params: dict[int, str]) -> ReluNormFold:
    """The fold of ``bn`` into ``lin``; :class:`ModelError` where a unit has ``gamma = 0``."""
    affine = norm_affine(norm, bn, "the Linear layer after it reads nothing of them, so the fold cannot divide by "
                                   "their scale")
    return ReluNormFold(linear, norm, affine.scale, affine.shift, affine.mean, affine.std, params[id(lin.weight)],
                        params[id(lin.bias)], trainable_name(bn.weight, params), trainable_name(bn.bias, params))
