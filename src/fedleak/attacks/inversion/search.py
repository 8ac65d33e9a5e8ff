"""The shared search: dummy inputs (and, for DLG, soft labels) whose simulated update matches the target.

:func:`invert` runs Adam (optionally signed, step-decayed, box-clamped) and/or L-BFGS from ``restarts``
random starts and keeps the point with the lowest objective; it stops at the iteration or time budget,
whichever runs out first. On a weight update the client's unknown learning rate is learned (``l2``) or
tied to the update's norm (scale-free objectives with several local steps).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from fedleak.attacks.inversion.objectives import OBJECTIVES, total_variation
from fedleak.attacks.inversion.target import Target
from fedleak.attacks.inversion.unroll import UNROLL_OPTIMIZERS, FunctionalModel
from fedleak.errors import FedleakError
from fedleak.validation import options_from, validate_fields


@dataclass(frozen=True)
class InversionSettings:
    """How an optimisation attack searches (every attack sets its own defaults; all are options).

    ``iterations``: budget of optimiser iterations per restart (for L-BFGS: objective evaluations, i.e.
    gradient queries). ``time_budget``: seconds for the whole attack (``None``: no limit); the attack
    stops at whichever budget runs out first and says so. ``signed``: Adam on the sign of the gradient
    (Inverting Gradients). ``box``: clamp the dummy data into this range after every Adam step, and the
    result in any case. ``lr_decay``: step decay by 10x at 3/8, 5/8 and 7/8 of the iterations.
    ``refine``: after Adam, polish the best point with this many L-BFGS evaluations (counted as iterations).
    ``init``: ``"uniform"`` (U[box]) or ``"normal"`` (N(0,1), DLG/DLM) dummy data.
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

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == "float64" else torch.float32


def settings_from(defaults: InversionSettings, options: Mapping[str, Any], attack: str) -> InversionSettings:
    """The ``attack``'s settings: its ``defaults`` with the keyword ``options`` applied (unknown names refused)."""
    values = dict(options)
    if values.get("box") is not None:
        values["box"] = tuple(float(v) for v in values["box"])
    return options_from(InversionSettings, values, error=FedleakError, what=f"option for the {attack} attack",
                        defaults=defaults)


@dataclass(frozen=True)
class InversionResult:
    """What :func:`invert` found: the best point over all restarts and how it was reached."""

    inputs: torch.Tensor  # free + fixed samples, detached
    labels: torch.Tensor  # hard labels
    loss: float
    iterations: int
    seconds: float
    learning_rate: float | None
    notes: list[str] = field(default_factory=list)


class _BudgetSpent(Exception):
    """Raised inside an L-BFGS closure when the evaluation or time budget is spent."""


def _progress_bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)


def invert(
    model: nn.Module,
    target: Target,
    settings: InversionSettings,
    *,
    batch_size: int,
    labels: torch.Tensor | None,
    fixed_inputs: torch.Tensor | None = None,
    fixed_labels: torch.Tensor | None = None,
    name: str = "inversion",
) -> InversionResult:
    """Search dummy inputs whose simulated update matches ``target`` (see the package doc).

    ``labels`` (``batch_size`` class indices) are fixed, or learned jointly as soft labels when
    ``settings.learn_labels``. ``fixed_inputs``/``fixed_labels`` are samples already known (e.g.
    certified by the exclusivity attack): they take part in the simulated update but are not optimised.
    """
    dtype = settings.torch_dtype
    fm = FunctionalModel(model, replace(target, params=[p.to(dtype) for p in target.params]))
    tgt = [t.to(dtype) for t in target.tensors]
    objective = OBJECTIVES[settings.objective](tgt)
    n_fixed = 0 if fixed_inputs is None else int(fixed_inputs.shape[0])
    n_free = batch_size - n_fixed
    if n_free < 1:
        raise FedleakError(f"nothing to optimise: batch size {batch_size} with {n_fixed} known sample(s)")
    fx = None if fixed_inputs is None else fixed_inputs.detach().to(dtype).reshape(n_fixed, *target.input_shape)
    fy = None if fixed_labels is None else fixed_labels.detach().long()
    K = int(fm.logits(fm.params, torch.zeros(1, *target.input_shape, dtype=dtype)).shape[-1])
    steps = 1
    if target.kind == "weights":
        steps = int(settings.local_steps or target.local_steps or 1)
    # How the simulated client's learning rate is set (weight updates only): with the L2 objective it is a
    # free variable (DLM). With a scale-free objective it cancels for one step; for several steps it still
    # shapes the trajectory but the objective barely constrains it, so it is tied to the update's norm
    # instead: a fixed point ``η <- η ||ΔW*|| / ||ΔW(x', η)||`` refreshed between optimiser rounds.
    lr_mode = None
    if target.kind == "weights":
        lr_mode = "learned" if settings.objective == "l2" else ("norm" if steps > 1 else None)
    target_norm = math.sqrt(objective.sq_norm)

    def simulate(x_free: torch.Tensor, y_free: torch.Tensor, log_lr: torch.Tensor | None) -> list[torch.Tensor]:
        x_all = x_free if fx is None else torch.cat([fx, x_free])
        if fy is not None:
            y_fixed = fy if y_free.dtype == torch.long else nn.functional.one_hot(fy, K).to(dtype)
            y_all = torch.cat([y_fixed, y_free])
        else:
            y_all = y_free
        lr = None
        if target.kind == "weights":
            lr = torch.exp(log_lr) if log_lr is not None else torch.ones((), dtype=dtype)
        return fm.simulate(x_all, y_all, kind=target.kind, lr=lr, steps=steps, optimizer=settings.client_optimizer,
                           local_batch_size=settings.local_batch_size, momentum=settings.momentum)

    gen = torch.Generator().manual_seed(int(settings.seed))
    start = time.perf_counter()
    deadline = None if settings.time_budget is None else start + float(settings.time_budget)
    best: tuple[float, torch.Tensor, torch.Tensor, float | None] | None = None
    total_iters = 0
    notes: list[str] = []
    stopped = False
    bar = _progress_bar(settings.progress, settings.iterations * settings.restarts, name)
    for restart in range(settings.restarts):
        if settings.init == "normal":
            x0 = torch.randn(n_free, *target.input_shape, generator=gen, dtype=dtype)
        else:
            lo, hi = settings.box if settings.box is not None else (0.0, 1.0)
            x0 = lo + (hi - lo) * torch.rand(n_free, *target.input_shape, generator=gen, dtype=dtype)
        x = x0.clone().requires_grad_(True)
        variables = [x]
        if settings.learn_labels:
            y_logits = torch.randn(n_free, K, generator=gen, dtype=dtype).requires_grad_(True)
            variables.append(y_logits)
        else:
            if labels is None:
                raise FedleakError("labels are needed unless they are learned")
            y_fixed_free = labels.long()
        log_lr = None
        if lr_mode is not None:
            log_lr = torch.zeros((), dtype=dtype)
            refresh_lr = _lr_refresher(simulate, x, y_logits if settings.learn_labels else None,
                                       None if settings.learn_labels else y_fixed_free, target_norm)
            log_lr = refresh_lr(log_lr)
            if lr_mode == "learned":
                log_lr.requires_grad_(True)
                variables.append(log_lr)

        def loss_fn() -> torch.Tensor:
            y_free = torch.softmax(y_logits, -1) if settings.learn_labels else y_fixed_free
            sim = simulate(x, y_free, log_lr)
            loss = objective(sim)
            if settings.tv > 0:
                loss = loss + settings.tv * total_variation(x, settings.tv_boundary)
            return loss

        run_best: tuple[float, torch.Tensor, torch.Tensor | None, float | None] | None = None
        iters = 0

        def remember(value: float) -> None:
            nonlocal run_best
            if math.isfinite(value) and (run_best is None or value < run_best[0]):
                run_best = (value, x.detach().clone(),
                            y_logits.detach().clone() if settings.learn_labels else None,
                            float(torch.exp(log_lr.detach())) if log_lr is not None else None)

        if settings.optimizer == "adam":
            opt = torch.optim.Adam(variables, lr=settings.lr)
            milestones = [int(settings.iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)] if settings.lr_decay else []
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
            for it in range(settings.iterations):
                if deadline is not None and time.perf_counter() > deadline:
                    stopped = True
                    break
                if lr_mode == "norm" and it % 20 == 19:
                    log_lr = refresh_lr(log_lr)
                opt.zero_grad(set_to_none=True)
                loss = loss_fn()
                grads = torch.autograd.grad(loss, variables)
                for v, g in zip(variables, grads):
                    v.grad = g.sign() if (settings.signed and v is x) else g
                remember(float(loss.detach()))
                opt.step()
                sched.step()
                if settings.box is not None:
                    with torch.no_grad():
                        x.clamp_(*settings.box)
                iters += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{float(loss.detach()):.3e}")
            remember(float(loss_fn().detach()))
        # L-BFGS: the optimiser itself, or a refinement of the best Adam point (``refine`` evaluations)
        budget = settings.iterations if settings.optimizer == "lbfgs" else int(settings.refine)
        lbfgs_lr = settings.lr if settings.optimizer == "lbfgs" else 1.0
        if budget > 0 and not stopped:
            if settings.optimizer == "adam" and run_best is not None:
                with torch.no_grad():
                    x.copy_(run_best[1])
            opt = torch.optim.LBFGS(variables, lr=lbfgs_lr, max_iter=20, history_size=100,
                                    tolerance_grad=1e-14, tolerance_change=1e-16, line_search_fn="strong_wolfe")
            evals = 0

            def closure() -> torch.Tensor:
                nonlocal evals, stopped
                if evals >= budget:
                    raise _BudgetSpent
                if deadline is not None and time.perf_counter() > deadline:
                    stopped = True
                    raise _BudgetSpent
                opt.zero_grad(set_to_none=True)
                loss = loss_fn()
                grads = torch.autograd.grad(loss, variables)
                for v, g in zip(variables, grads):
                    v.grad = g
                evals += 1
                remember(float(loss.detach()))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{float(loss.detach()):.3e}")
                return loss

            stall = 0
            while evals < budget:
                if deadline is not None and time.perf_counter() > deadline:
                    stopped = True
                    break
                before = evals
                if lr_mode == "norm" and evals > 0:
                    log_lr = refresh_lr(log_lr)
                    run_best = None  # the objective moved with η: restart the bookkeeping from here
                    remember(float(loss_fn().detach()))
                prev = run_best[0] if run_best is not None else float("inf")
                opt.param_groups[0]["max_iter"] = max(1, min(20, budget - evals))
                opt.param_groups[0]["max_eval"] = max(1, min(25, budget - evals))
                try:
                    opt.step(closure)
                except _BudgetSpent:
                    break
                now = run_best[0] if run_best is not None else float("inf")
                if evals == before or not now < prev:
                    stall += 1
                    if stall >= 2:
                        notes.append(f"restart {restart}: L-BFGS converged after {evals} evaluations (loss {now:.2e})")
                        break
                    opt = torch.optim.LBFGS(variables, lr=lbfgs_lr, max_iter=20, history_size=100,
                                            tolerance_grad=1e-14, tolerance_change=1e-16,
                                            line_search_fn="strong_wolfe")
                else:
                    stall = 0
            iters += evals
        total_iters += iters
        if run_best is not None:
            loss_value, xb, yb, lrb = run_best
            y_hard = yb.argmax(-1) if yb is not None else y_fixed_free
            if best is None or loss_value < best[0]:
                best = (loss_value, xb, y_hard, lrb)
        if stopped:
            break
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    if best is None:
        raise FedleakError(f"the {name} attack produced no finite objective value (the update may be degenerate)")
    if stopped:
        notes.append(f"stopped by the time budget of {settings.time_budget:g} s after {total_iters} iteration(s)")
    loss_value, xb, y_hard, lrb = best
    if settings.box is not None:
        xb = xb.clamp(*settings.box)
    x_all = xb if fx is None else torch.cat([fx, xb])
    y_all = y_hard if fy is None else torch.cat([fy, y_hard])
    return InversionResult(x_all.detach(), y_all.detach(), loss_value, total_iters, seconds, lrb, notes)


def _lr_refresher(simulate, x, y_logits, y_fixed, target_norm: float):
    """A function that moves ``log η`` to where the simulated update's norm equals the observed one."""

    def refresh(log_lr: torch.Tensor) -> torch.Tensor:
        value = log_lr.detach().clone()
        y = torch.softmax(y_logits.detach(), -1) if y_fixed is None else y_fixed
        for _ in range(3):
            sim = simulate(x.detach(), y, value)
            norm = math.sqrt(sum(float((g.detach() ** 2).sum()) for g in sim))
            if not (norm > 0 and math.isfinite(norm)):
                break
            step = math.log(target_norm / norm)
            value = value + step
            if abs(step) < 1e-3:
                break
        return value

    return refresh
