"""The simulated client: gradients and unrolled local training, differentiable w.r.t. the dummy data.

* the simulated update of a FedSGD client is the mean cross-entropy gradient at the model's weights (with the
  client's label smoothing and class weights, where the attack is told them);
* the simulated update of a FedAvg client is ``W_0 - W_E``, obtained by unrolling E local steps
  differentiably from the global weights ``W_0`` (``update.before``) with a *learned* learning rate,
  because the server does not know it. When E is not known it is assumed to be 1 (the whole weight
  change is treated as one aggregated gradient step); see ``docs/weight-leakage.md``.

The model is never mutated: its weights are copied and the network is evaluated with
:func:`torch.func.functional_call`, so any differentiable ``nn.Module`` works (MLP, CNN, ...).
Second-order autograd (``create_graph=True``) differentiates the simulated update w.r.t. ``x'``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from fedleak.attacks.inversion.target import Target
from fedleak.client_loss import client_loss
from fedleak.errors import FedleakError, ModelError
from fedleak.forward_failure import forward_failure, in_training_mode_with_batch_norm
from fedleak.logits_of import per_sample_logits

#: unrolled local optimizers the attacker can assume (the client's real optimizer is private)
UNROLL_OPTIMIZERS = ("sgd", "momentum", "adam")


class FunctionalModel:
    """Evaluate ``model`` at given weights (never its own) and differentiate through its gradient."""

    def __init__(self, model: nn.Module, target: Target, *, label_smoothing: float = 0.0,
                 class_weights: tuple[float, ...] | None = None, focal_gamma: float = 0.0):
        self.model = model
        self.names = target.names
        self.buffers = target.buffers
        self.params = [p.detach().clone().requires_grad_(True) for p in target.params]
        self.label_smoothing, self.class_weights, self.focal_gamma = label_smoothing, class_weights, focal_gamma

    def logits(self, params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        try:
            return per_sample_logits(functional_call(self.model, {**dict(zip(self.names, params)), **self.buffers},
                                                     (x,)), len(x))
        except (ValueError, RuntimeError) as exc:
            if isinstance(exc, FedleakError):
                raise
            why = forward_failure(self.model, x, exc)
            if x.shape[0] == 1 and in_training_mode_with_batch_norm(self.model):
                why += ": pass batch_size (or an update that reports its num_examples), or the model in eval mode"
            raise ModelError(f"the attack's dummy batch: {why}") from None

    def grads(self, params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """The gradient of the client's mean cross-entropy (with its label smoothing and class weights, or its focal
        loss, as :func:`~fedleak.client_loss.client_loss` takes them); ``y`` holds class indices or (soft)
        probabilities."""
        loss = client_loss(self.logits(params, x), y, label_smoothing=self.label_smoothing,
                           class_weights=self.class_weights, focal_gamma=self.focal_gamma)
        return list(torch.autograd.grad(loss, params, create_graph=True, materialize_grads=True))

    def simulate(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        kind: str,
        lr: torch.Tensor | None = None,
        steps: int = 1,
        optimizer: str = "sgd",
        local_batch_size: int | None = None,
        momentum: float = 0.9,
    ) -> list[torch.Tensor]:
        """The update a client holding ``(x, y)`` would send: its gradient, or ``W_0 - W_E`` after
        ``steps`` local steps of ``optimizer`` at learning rate ``lr`` (mini-batches of the dummy batch
        in a fixed order when ``local_batch_size`` is set)."""
        if kind == "gradient":
            return self.grads(self.params, x, y)
        if lr is None:
            raise FedleakError("a simulated weight update needs a learning rate")
        n = x.shape[0]
        if local_batch_size is None or local_batch_size >= n:
            chunks = [slice(0, n)]
        else:
            chunks = [slice(i, i + local_batch_size) for i in range(0, n, local_batch_size)]
        p = list(self.params)
        state: list[Any] = [None] * len(p)
        state2: list[Any] = [None] * len(p)
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        for t in range(steps):
            sl = chunks[t % len(chunks)]
            g = self.grads(p, x[sl], y[sl])
            if optimizer == "sgd":
                p = [pi - lr * gi for pi, gi in zip(p, g)]
            elif optimizer == "momentum":
                state = [gi if v is None else momentum * v + gi for v, gi in zip(state, g)]
                p = [pi - lr * v for pi, v in zip(p, state)]
            elif optimizer == "adam":
                state = [(1 - beta1) * gi if m is None else beta1 * m + (1 - beta1) * gi for m, gi in zip(state, g)]
                state2 = [(1 - beta2) * gi * gi if v is None else beta2 * v + (1 - beta2) * gi * gi
                          for v, gi in zip(state2, g)]
                c1, c2 = 1 - beta1 ** (t + 1), 1 - beta2 ** (t + 1)
                # sqrt of a tensor that can be exactly 0 has an infinite derivative: guard it
                p = [pi - lr * (m / c1) / (torch.sqrt(v / c2 + 1e-24) + eps) for pi, m, v in zip(p, state, state2)]
            else:
                raise FedleakError(f"unknown client optimizer '{optimizer}'; choose from {UNROLL_OPTIMIZERS}")
        return [p0 - pe for p0, pe in zip(self.params, p)]


def lr_refresher(simulate, current_x, y_logits, y_fixed, target_norm: float, spent=lambda: False):
    """A function that moves ``log η`` to where the simulated update's norm equals the observed one.

    ``simulate(x, y, log_lr)`` gives the simulated update; ``current_x()`` the dummy inputs; ``y_logits`` (soft
    labels) or ``y_fixed`` (class indices) the labels; ``target_norm`` the observed update's norm; ``spent()``
    whether the time is up (no further simulation is begun after the first).
    """

    def refresh(log_lr: torch.Tensor) -> torch.Tensor:
        value = log_lr.detach().clone()
        y = torch.softmax(y_logits.detach(), -1) if y_fixed is None else y_fixed
        x = current_x().detach()
        for k in range(3):
            if k and spent():
                break
            sim = simulate(x, y, value)
            norm = math.sqrt(sum(float((g.detach() ** 2).sum()) for g in sim))
            if not (norm > 0 and math.isfinite(norm)):
                break
            step = math.log(target_norm / norm)
            value = value + step
            if abs(step) < 1e-3:
                break
        return value

    return refresh
