"""DLM and DLM+ (Zhao, Luo, Ding: "Deep Leakage from Model in Federated Learning"; algorithms spec §5).

The server knows the global weights ``W_0`` it sent and the client's new weights ``W_E``, but not the
client's learning rate or optimizer state. Both attacks search dummy inputs whose simulated local training
reproduces ``ΔW = W_0 - W_E``:

* **DLM**: ``min_{x', η} Σ_l ‖ΔW_l(x', η) − ΔW_l‖² / Σ_l ‖ΔW_l‖²``. The learning rate ``η`` is learned in
  log space (initialised from the update's norm). The paper learns ``k ≈ 1/η`` multiplying the target;
  putting ``η`` on the simulated side is the same model but removes the degenerate direction in which
  both the dummy gradient and ``k`` shrink to zero.
* **DLM+**: the scale-free objective ``Σ_l ‖ΔW_l(x')/ν − ΔW_l/ν*‖²`` with ``ν`` the mean per-layer norm.
  For one local step ``η`` cancels entirely; for several it still shapes the trajectory and is learned.

``ΔW(x', η)`` unrolls the client's local steps differentiably when their number is known
(``update.local_steps`` or the ``local_steps`` option); otherwise ΔW is treated as a single aggregated SGD
step at ``W_0``. The client's optimizer is assumed to be plain full-batch SGD unless the threat model says
otherwise (``client_optimizer="momentum"|"adam"``, ``local_batch_size``). Labels are inferred from the
output layer's sign pattern (scale-free, so it works without the learning rate); the paper's joint label
optimisation is available with ``learn_labels=True``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fedleak.attacks.inversion import InversionSettings, run_optimization_attack
from fedleak.attacks.registry import register_attack
from fedleak.reconstruction import Reconstruction

# Adam with step decay: on small MLPs/LeNets it reached higher PSNR per second than L-BFGS, which in float32
# stalls in poor local minima (docs/weight-leakage.md); ``optimizer="lbfgs"`` remains available.
DLM_DEFAULTS = InversionSettings(objective="l2", optimizer="adam", lr=0.1, lr_decay=True, iterations=500,
                                 init="uniform", box=(0.0, 1.0))
DLM_PLUS_DEFAULTS = InversionSettings(objective="normalized", optimizer="adam", lr=0.1, lr_decay=True,
                                      iterations=500, init="uniform", box=(0.0, 1.0))


@register_attack("dlm", update_kinds=("weights",), takes_defense=True, optimises=True, reads_range=True,
                 takes_loss=True,
                 description="DLM: match the weight change with a learned learning rate (local steps unrolled)")
def dlm_attack(model: nn.Module, update: Any, **options: Any) -> Reconstruction:
    """DLM on a :class:`~fedleak.WeightUpdate`. Options: ``batch_size`` (default: ``num_examples``),
    ``labels``, ``input_shape``, ``local_steps``, ``data_range`` (the range the client's inputs live on, the
    search's box; [0, 1] by default) and the fields of
    :class:`~fedleak.attacks.inversion.InversionSettings` (``iterations``, ``time_budget``,
    ``progress``, ``seed``, ``optimizer``, ...)."""
    return run_optimization_attack("dlm", DLM_DEFAULTS, model, update, **options)


@register_attack("dlm+", update_kinds=("weights",), takes_defense=True, optimises=True, reads_range=True,
                 takes_loss=True,
                 description="DLM+: scale-free normalised matching of the weight change (no learning rate)")
def dlm_plus_attack(model: nn.Module, update: Any, **options: Any) -> Reconstruction:
    """DLM+ on a :class:`~fedleak.WeightUpdate`; options as :func:`dlm_attack`."""
    return run_optimization_attack("dlm+", DLM_PLUS_DEFAULTS, model, update, **options)
