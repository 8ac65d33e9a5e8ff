"""How an optimisation attack searches: :class:`InversionSettings` (every attack's defaults, each an option) and
:func:`settings_from`, which applies a user's keyword options and the data's range to an attack's defaults."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from fedleak.attacks.inversion.objectives import OBJECTIVES
from fedleak.attacks.inversion.unroll import UNROLL_OPTIMIZERS
from fedleak.client_loss import check_class_weights, check_label_smoothing
from fedleak.errors import FedleakError
from fedleak.focal import check_focal_gamma
from fedleak.option_fields import options_from, validate_fields
from fedleak.validation import check_data_range


@dataclass(frozen=True)
class InversionSettings:
    """How an optimisation attack searches (every attack sets its own defaults; all are options).

    ``iterations``: budget of optimiser iterations per restart (for L-BFGS: objective evaluations, i.e.
    gradient queries). ``time_budget``: seconds for the whole attack (``None``: no limit); the attack
    stops at whichever budget runs out first and says so. ``lr``: the optimiser's learning rate; Adam's on the
    inputs is in units of the box's width (:attr:`box_width`). ``signed``: Adam on the sign of the gradient
    (Inverting Gradients). ``box``: clamp the dummy data into this range after every Adam step, and the
    result in any case. ``lr_decay``: step decay by 10x at 3/8, 5/8 and 7/8 of the iterations.
    ``refine``: after Adam, polish the best point with this many L-BFGS evaluations (counted as iterations).
    ``init``: ``"uniform"`` (U[box]) or ``"normal"`` (N(0,1), DLG/DLM) dummy data. ``warm_lr``: the Adam
    learning rate, relative to ``lr``, of samples started from a known estimate (``auto`` starts the samples the
    exact route rebuilt but did not certify there: they should move little). ``stop_below``: stop once the
    matching objective (without TV) falls below this value (0: never; ``auto`` stops at 1e-9, where the
    simulated update matches the observed one to about float32 precision and more iterations change nothing).
    ``label_smoothing`` / ``class_weights``: the client's cross-entropy's (``F.cross_entropy``'s ``label_smoothing``
    and ``weight``), which the simulated update takes; ``focal_gamma``: the exponent of the client's focal loss
    instead (:mod:`fedleak.focal`; its labels are class indices, so not with ``learn_labels``).
    """

    objective: str = "l2"
    optimizer: str = "lbfgs"
    lr: float = 1.0
    iterations: int = 300
    restarts: int = 1
    tv: float = 0.0
    tv_boundary: str = "zero"
    signed: bool = False
    box: tuple[float, float] | None = (0.0, 1.0)
    lr_decay: bool = False
    refine: int = 0
    init: str = "uniform"
    time_budget: float | None = None
    seed: int = 0
    progress: bool = False
    dtype: str = "float32"
    learn_labels: bool = False
    client_optimizer: str = "sgd"
    local_steps: int | None = None
    local_batch_size: int | None = None
    momentum: float = 0.9
    warm_lr: float = 0.01
    stop_below: float = 0.0
    label_smoothing: float = 0.0
    class_weights: tuple[float, ...] | None = None
    focal_gamma: float = 0.0

    def __post_init__(self) -> None:
        validate_fields(self)  # types and signs first, then the checks below
        if self.objective not in OBJECTIVES:
            raise FedleakError(f"unknown objective '{self.objective}'; choose from {sorted(OBJECTIVES)}")
        if self.optimizer not in ("adam", "lbfgs"):
            raise FedleakError(f"optimizer must be 'adam' or 'lbfgs', got '{self.optimizer}'")
        if int(self.iterations) < 1:
            raise FedleakError(f"iterations must be at least 1, got {self.iterations}")
        if int(self.refine) < 0:
            raise FedleakError(f"refine must be a number of L-BFGS evaluations >= 0, got {self.refine}")
        if int(self.restarts) < 1:
            raise FedleakError(f"restarts must be at least 1, got {self.restarts}")
        if not self.lr > 0:
            raise FedleakError(f"lr must be positive, got {self.lr}")
        if not self.warm_lr > 0:
            raise FedleakError(f"warm_lr must be positive, got {self.warm_lr}")
        if not self.stop_below >= 0:
            raise FedleakError(f"stop_below must be a non-negative objective value, got {self.stop_below}")
        if self.tv < 0:
            raise FedleakError(f"tv must be non-negative, got {self.tv}")
        if self.tv_boundary not in ("zero", "none"):
            raise FedleakError(f"tv_boundary must be 'zero' or 'none', got '{self.tv_boundary}'")
        if self.time_budget is not None and not self.time_budget > 0:
            raise FedleakError(f"time_budget must be positive seconds, got {self.time_budget}")
        if self.init not in ("uniform", "normal"):
            raise FedleakError(f"init must be 'uniform' or 'normal', got '{self.init}'")
        if self.dtype not in ("float32", "float64"):
            raise FedleakError(f"dtype must be 'float32' or 'float64', got '{self.dtype}'")
        if self.client_optimizer not in UNROLL_OPTIMIZERS:
            raise FedleakError(f"client_optimizer must be one of {UNROLL_OPTIMIZERS}, got '{self.client_optimizer}'")
        if self.local_steps is not None and int(self.local_steps) < 1:
            raise FedleakError(f"local_steps must be at least 1, got {self.local_steps}")
        if self.box is not None and not self.box[0] < self.box[1]:
            raise FedleakError(f"box must be (low, high) with low < high, got {self.box}")
        check_label_smoothing(self.label_smoothing)
        object.__setattr__(self, "class_weights",
                           check_class_weights(self.class_weights, label_smoothing=self.label_smoothing))
        if check_focal_gamma(self.focal_gamma, label_smoothing=self.label_smoothing, class_weights=self.class_weights) \
                and self.learn_labels:
            raise FedleakError("a focal loss takes class indices, and this search learns soft labels "
                               "(learn_labels=True): pass learn_labels=False, or labels")

    @property
    def box_width(self) -> float:
        """The box's width (1 without a box): Adam's learning rate on the inputs is in its units, so that a search
        moves alike over data in [0, 1], in [-1, 1] or on 0..255."""
        return 1.0 if self.box is None else self.box[1] - self.box[0]

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == "float64" else torch.float32


def settings_from(defaults: InversionSettings, options: Mapping[str, Any], attack: str,
                  data_range: object = None) -> InversionSettings:
    """The ``attack``'s settings: its ``defaults`` with the keyword ``options`` applied (unknown names refused).

    ``data_range``: the range the client's inputs live on (normalised data's, e.g. ``(-1, 1)``): a search that keeps
    its inputs in a box (IG, DLM, DLM+: ``[0, 1]`` by default) searches inside it, unless ``box`` is given too; a
    search that runs unboxed as published (DLG, iDLG) refuses it, saying how to box it."""
    values = dict(options)
    data_range = check_data_range(data_range)
    if data_range is not None and "box" not in values:
        if defaults.box is None:
            raise FedleakError(f"the {attack} attack searches unboxed, as published, and takes no data_range; "
                               "box=(low, high) keeps its inputs in a range")
        values["box"] = data_range
    if values.get("box") is not None:
        values["box"] = tuple(float(v) for v in values["box"])
    return options_from(InversionSettings, values, error=FedleakError, what=f"option for the {attack} attack",
                        defaults=defaults)
