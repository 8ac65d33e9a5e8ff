"""The focal loss (Lin et al., ICCV 2017) a client may train with instead of the plain cross-entropy.

``FL(x, y) = -(1 - p_y)^γ log p_y`` with ``p = softmax(logits)``; ``γ = 0`` is the cross-entropy. Clients with
imbalanced classes (medical images, rare events) use it to weigh down the samples the model already gets right. It
depends on the logits only through ``p_y``, so its gradient with respect to them is a positive per-sample multiple
of the cross-entropy's, ``s(p_y) (p - onehot(y))`` with ``s(p) = (1 - p)^γ - γ p (1 - p)^(γ - 1) log p``
(:func:`focal_factor`): each sample enters the update at its own scale ``s / M``, which the exact attack recomputes
from the rebuilt input, as it does the cross-entropy's ``1 / M``. The α-balanced variant and a focal loss with
label smoothing are not modelled and are refused.
"""

from __future__ import annotations

import torch

from fedleak.errors import FedleakError
from fedleak.validation import check_float

MAX_GAMMA = 10.0  # larger exponents flatten the loss of every sample the model gets half right to zero


def check_focal_gamma(value: object, *, label_smoothing: float | None = 0.0,
                      class_weights: object = None) -> float:
    """The focal loss's exponent ``γ`` in [0, 10] (0: the plain cross-entropy); refused with label smoothing or
    class weights, whose combination with it the attacks do not model."""
    gamma = check_float("focal_gamma", value, low=0.0, high=MAX_GAMMA)
    if gamma and (label_smoothing or class_weights is not None):
        raise FedleakError("focal_gamma with label_smoothing or class_weights is not supported (their loss vectors "
                           "are not p - onehot(y) times a factor of p_y alone): pass one")
    return gamma


def focal_factor(log_p: torch.Tensor, gamma: float) -> torch.Tensor:
    """``s(p) = (1 - p)^γ - γ p (1 - p)^(γ - 1) log p`` from ``log p`` (a sample's log-probability of its label): the
    focal loss's gradient with respect to the logits is ``s(p_y) (p - onehot(y))``. It is 1 at ``γ = 0``, tends to 1
    as ``p -> 0`` and to 0 as ``p -> 1``, and is positive in between."""
    if gamma == 0:
        return torch.ones_like(log_p)
    q = -torch.expm1(log_p)  # 1 - p, without the cancellation of 1 - exp(log p) near p = 1
    p = log_p.exp()
    safe = torch.where(q > 0, q, torch.ones_like(q))  # q = 0 (p rounds to 1): s = 0, the limit
    p_log_p = torch.where(p > 0, p * log_p, torch.zeros_like(p))  # p = 0 (log p = -inf): 0, the limit
    s = safe.pow(gamma) - gamma * safe.pow(gamma - 1) * p_log_p
    return torch.where(q > 0, s, torch.zeros_like(s))


def focal_loss(logits: torch.Tensor, labels: torch.Tensor, gamma: float, reduction: str = "mean") -> torch.Tensor:
    """The focal loss of ``logits`` (N x K) at class indices ``labels``, reduced as ``F.cross_entropy`` reduces
    (``"mean"``, ``"sum"`` or ``"none"``), written as clients write it."""
    log_p = torch.log_softmax(logits, dim=1).gather(1, labels.long()[:, None]).squeeze(1)
    loss = -((-torch.expm1(log_p)) ** gamma) * log_p
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.mean()
