"""An eval-mode ``BatchNorm1d`` on the model's input (tabular models normalise their features so), read as a map.

In eval mode such a norm is ``u = a x + c`` per input value (``a = gamma / sqrt(running_var + eps)``,
``c = beta - a running_mean``): the model's first ``Linear`` layer reads ``u``. The exact methods read the model
without it and rebuild ``u``, which the norm's :class:`~fedleak.nets.input_map.InputMap` takes back to the inputs,
as they read a normalisation written inside ``forward``. The norm's own parameters add nothing about the batch:
``dL/dbeta = W^T g`` (``g`` the first layer's bias gradient) and ``gamma dL/dgamma + beta dL/dbeta`` is, per input
value, the column sums of ``W * G`` (``G`` its weight gradient); :func:`input_norm_misfit` checks them, and a
client that ran the norm in training mode (each batch normalised by its own statistics) does not meet them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.nn import functional as F

from fedleak.errors import ModelError
from fedleak.nets.converters import reshape
from fedleak.nets.frontend import converter_key
from fedleak.nets.input_map import InputMap
from fedleak.nets.input_peel import shape_query
from fedleak.nets.layers import BatchNorm
from fedleak.nets.ops import CONVERTERS
from fedleak.reconstruction import Reconstruction

F64 = torch.float64

# a batch normalised by its own statistics has a mean first-layer input of beta on every value, to the certified
# inputs' error (at most 1e-4 of their range); one normalised by the running statistics is off by
# a (batch mean - running mean), about gamma / sqrt(M) of the spread, on its most distant value far more than this
# share of the range
TRAINING_MEAN_TOL = 1e-3

@dataclass(frozen=True)
class InputNorm:
    """The norm ``module`` (path ``name``) on the model's input, read by the first Linear layer ``linear``
    (``weight``, ``bias``: its parameter names, ``bias`` None without one); ``gamma``, ``beta``: the norm's
    trainable parameter names (None without)."""

    name: str
    module: nn.BatchNorm1d
    linear: nn.Linear
    weight: str
    bias: str | None
    gamma: str | None
    beta: str | None

    def input_map(self, eps: float) -> InputMap:
        """The norm as the map of the model's input values (float64 ``a``, ``c``) with what bounds the client's
        rounding of it (torch computes ``x * (gamma * invstd) + (beta - mean * gamma * invstd)``: two roundings of
        the value, two of the folded constants), ``eps`` its dtype's epsilon."""
        bn = self.module
        a, c = BatchNorm(self.name, bn, None, None).affine(F64)
        if bool((a == 0).any()):
            units = torch.nonzero(a == 0).flatten().tolist()[:5]
            raise ModelError(f"BatchNorm1d '{self.name}' on the model's input has gamma = 0 on value(s) {units}: the "
                             "first layer never sees them, so no input can be rebuilt whole; 'auto' and the "
                             "optimisation attacks still apply")
        beta = bn.bias.detach().to(F64) if bn.bias is not None else torch.zeros_like(a)
        offsets = 2 * (c / a).abs() + (beta / a).abs() + bn.running_mean.detach().to(F64).abs()
        module = bn

        def apply(x: torch.Tensor) -> torch.Tensor:
            flat = x.reshape(x.shape[0], -1)
            return F.batch_norm(flat, module.running_mean, module.running_var, module.weight, module.bias,
                                training=False, eps=module.eps)

        return InputMap(a.cpu(), c.cpu(), offsets.cpu(), eps, (self.name, self.name), apply)

    def misfit(self, grads: dict[str, torch.Tensor]) -> str:
        """How the client's gradient misses what eval mode fixes the norm's own gradient to (empty where it does
        not; where its first layer sends no gradient, nothing is checked)."""
        if self.weight not in grads:
            return ""
        W = self.linear.weight.detach()
        G = grads[self.weight].to(W.dtype)
        misses = []
        if self.beta is not None and self.bias is not None and self.beta in grads and self.bias in grads:
            g = grads[self.bias].to(W.dtype)
            want, size = W.T @ g, W.abs().T @ g.abs()
            off = (grads[self.beta].to(F64) - want.to(F64)).abs()
            if missed(off, size.to(F64) + grads[self.beta].to(F64).abs()):
                misses.append("beta's gradient is not W^T times the first layer's bias gradient")
        if self.gamma is not None and self.gamma in grads:
            bn = self.module
            want = (W * G).sum(0).to(F64)
            size = (W.abs() * G.abs()).sum(0).to(F64)
            have = bn.weight.detach().to(F64) * grads[self.gamma].to(F64)
            if self.beta is not None and self.beta in grads:
                have = have + bn.bias.detach().to(F64) * grads[self.beta].to(F64)
            if missed((have - want).abs(), size + have.abs()):
                misses.append("gamma's and beta's gradients are not the ones eval mode fixes them to")
        if not misses:
            return ""
        return (f"BatchNorm1d '{self.name}' on the model's input: {'; '.join(misses)} (a client that runs it in "
                "training mode normalises by each batch's own statistics, which the exact methods do not model)")

    def names(self) -> tuple[str, ...]:
        return tuple(n for n in (self.gamma, self.beta) if n)

    def unproven(self, rec: Reconstruction) -> str:
        """Why ``rec``'s certificates (of the inputs as the first layer reads them) do not carry through the norm's
        map, or empty. A client that runs the norm in training mode normalises each batch by its own statistics: its
        gradient fits them as well (the identities hold in both modes), its first-layer inputs are certified as they
        are, and the running statistics then map them to wrong inputs. A whole batch rebuilt shows its mode (one
        sample too: a batch of copies normalised in training mode reads as one sample at ``beta``), since in training
        mode its mean first-layer input is the norm's ``beta`` on every value (to the certified inputs' error), and in
        eval mode ``a (batch mean - running mean) + beta``, off by :data:`TRAINING_MEAN_TOL` of the range on some
        value."""
        if rec.num_certified == 0:
            return ""
        why = (f"the BatchNorm1d '{self.name}' on the model's input may have run in training mode, normalising the "
               "batch by its own statistics, which its gradient does not tell from eval mode")
        if not rec.batch_certified:
            return (f"{why}; only a whole batch rebuilt shows which (its mean input): the first layer's inputs are "
                    "certified, not these inputs")
        u = rec.inputs.detach().reshape(len(rec), -1).to(F64).cpu()
        bn = self.module
        beta = bn.bias.detach().to(F64).cpu() if bn.bias is not None else torch.zeros(u.shape[1], dtype=F64)
        off = float((u.mean(0) - beta).abs().max())
        if off <= TRAINING_MEAN_TOL * float(u.max() - u.min()):
            return (f"{why}; this batch's mean first-layer input is the norm's beta on every value, as in training "
                    "mode, where its inputs' own mean and spread are lost: the first layer's inputs are certified, "
                    "not these inputs")
        return ""


# how far a norm's parameter gradient may stray from what eval mode fixes it to, relative to the sums it is made of:
# the client's float32 sums carry a few epsilons of them per sample; a batch normalised by its own statistics misses
# by a share of the whole
IDENTITY_TOL = 1e-3


def missed(off: torch.Tensor, size: torch.Tensor) -> bool:
    """Whether an identity misses by more than the client's rounding can: :data:`IDENTITY_TOL` of each entry's terms
    (``size``), or of their mean over the layer (a sum that cancels is off by a share of its terms, not of itself)."""
    return bool((off > IDENTITY_TOL * (size + size.mean()) + 1e-30).any())


def find_input_norm(gm: fx.GraphModule, modules: dict[str, nn.Module], calls: dict[str, int],
                    params: dict[int, str]) -> tuple[fx.Node, InputNorm] | None:
    """The eval-mode ``BatchNorm1d`` node that reads the model's input (through reshapes only) and that only the
    first ``Linear`` layer reads, with what reading it needs; None where there is none."""
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    node = placeholder
    while len(users := [u for u in node.users if not shape_query(u)]) == 1:  # (x.size(0) reads no value)
        user = users[0]
        module = modules.get(user.target) if user.op == "call_module" else None
        if isinstance(module, nn.BatchNorm1d):
            return _read(user, modules, calls, params)
        key = converter_key(user, module)
        if key is None or CONVERTERS.get(key) is not reshape:  # (a flatten of images or tables, as the frontend reads)
            return None
        node = user
    return None


def _read(node: fx.Node, modules: dict[str, nn.Module], calls: dict[str, int],
          params: dict[int, str]) -> tuple[fx.Node, InputNorm] | None:
    bn = modules[node.target]
    after = next(iter(node.users)) if len(node.users) == 1 else None
    lin = modules.get(after.target) if after is not None and after.op == "call_module" else None
    if (bn.running_mean is None or calls[node.target] != 1 or not isinstance(lin, nn.Linear)
            or calls[after.target] != 1 or bn.num_features != lin.in_features):  # (per feature of flat inputs)
        return None
    return node, InputNorm(node.target, bn, lin, params[id(lin.weight)], trainable_name(lin.bias, params),
                           trainable_name(bn.weight, params), trainable_name(bn.bias, params))


def trainable_name(p: torch.Tensor | None, params: dict[int, str]) -> str | None:
    """The name of parameter ``p`` (``params``: names by ``id``) where it exists and is trained, else None."""
    return params.get(id(p)) if p is not None and p.requires_grad else None
