"""The shared search: dummy inputs (and, for DLG, soft labels) whose simulated update matches the target.

:func:`invert` runs Adam (optionally signed, step-decayed, box-clamped) and/or L-BFGS from ``restarts``
random starts (the first may start some samples from known estimates) and keeps the point with the lowest
objective; it stops at the iteration or time budget, whichever runs out first, and a time-limited run decays
its learning rate over the iterations that fit (:class:`~fedleak.attacks.inversion.clock.StepDecay`). On a
weight update the client's unknown learning rate is learned (``l2``) or tied to the update's norm
(scale-free objectives with several local steps).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from fedleak.attacks.inversion.clock import RunClock, StepDecay
from fedleak.attacks.inversion.estimates import restore_estimates
from fedleak.attacks.inversion.objectives import OBJECTIVES, total_variation
from fedleak.attacks.inversion.settings import InversionSettings
from fedleak.attacks.inversion.target import Target
from fedleak.attacks.inversion.unroll import FunctionalModel, lr_refresher
from fedleak.errors import FedleakError


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


def start_seed(seed: int) -> int:
    """The seed of the random starting point, derived from the attack's ``seed`` so that it never equals a
    stream a user draws test data from (``torch.manual_seed(seed)``; ``torch.rand`` with the same seed would
    start the search on the very batch and report a perfect reconstruction the update never gave)."""
    import numpy as np

    return int(np.random.SeedSequence([int(seed), 0x1E4C]).generate_state(1)[0])


def invert(
    model: nn.Module,
    target: Target,
    settings: InversionSettings,
    *,
    batch_size: int,
    labels: torch.Tensor | None,
    fixed_inputs: torch.Tensor | None = None,
    fixed_labels: torch.Tensor | None = None,
    warm_start: torch.Tensor | None = None,
    name: str = "inversion",
    clock: RunClock | None = None,
    forward: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None,
) -> InversionResult:
    """Search dummy inputs whose simulated update matches ``target`` (see the package doc).

    ``labels`` (``batch_size`` class indices) are fixed, or learned jointly as soft labels when
    ``settings.learn_labels``. ``fixed_inputs``/``fixed_labels`` are samples already known (e.g.
    certified by the exclusivity attack): they take part in the simulated update but are not optimised.
    ``warm_start``: starting inputs of the first free samples (first restart), moved at ``warm_lr`` times the
    learning rate. ``clock``: the run's clock (time budget and progress bar) when the search is one stage of a
    longer run; without it the search makes its own from ``time_budget`` and ``progress``. With a clock,
    ``time_budget`` (if set) limits this stage further. ``forward``: the client's defenses as a function of the
    simulated update (:class:`~fedleak.attacks.defense_forward.ForwardModel`), applied before matching.
    """
    own_clock = clock is None
    clock = clock or RunClock(settings.time_budget, progress=settings.progress)
    try:
        return _invert(model, target, settings, batch_size, labels, fixed_inputs, fixed_labels, warm_start, name,
                       clock, None if own_clock else settings.time_budget, forward)
    finally:
        if own_clock:
            clock.close()


def _invert(model, target, settings, batch_size, labels, fixed_inputs, fixed_labels, warm_start, name,
            clock: RunClock, stage_limit: float | None, forward=None) -> InversionResult:
    dtype = settings.torch_dtype
    fm = FunctionalModel(model, replace(target, params=[p.to(dtype) for p in target.params]),
                         label_smoothing=settings.label_smoothing, class_weights=settings.class_weights,
                         focal_gamma=settings.focal_gamma)
    tgt = [t.to(dtype) for t in target.tensors]
    objective = OBJECTIVES[settings.objective](tgt)
    n_fixed = 0 if fixed_inputs is None else int(fixed_inputs.shape[0])
    n_free = batch_size - n_fixed
    if n_free < 1:
        raise FedleakError(f"nothing to optimise: batch size {batch_size} with {n_fixed} known sample(s)")
    fx = None if fixed_inputs is None else fixed_inputs.detach().to(dtype).reshape(n_fixed, *target.input_shape)
    fy = None if fixed_labels is None else fixed_labels.detach().long()
    warm = None
    if warm_start is not None and len(warm_start):
        warm = warm_start.detach().to(dtype).reshape(-1, *target.input_shape)[:n_free]
        if settings.box is not None:
            warm = warm.clamp(*settings.box)
    K = int(fm.logits(fm.params, torch.zeros(2, *target.input_shape, dtype=dtype)).shape[-1])
    steps = 1
    if target.kind == "weights":
        steps = int(settings.local_steps or target.local_steps or 1)
    # the simulated client's learning rate (weight updates): learned with L2 (DLM); with a scale-free objective it
    # cancels for one step, and for several it is tied to the update's norm (``η <- η ||ΔW*|| / ||ΔW(x', η)||``)
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
        sim = fm.simulate(x_all, y_all, kind=target.kind, lr=lr, steps=steps, optimizer=settings.client_optimizer,
                          local_batch_size=settings.local_batch_size, momentum=settings.momentum)
        return sim if forward is None else forward(sim)  # what the defended client would have sent

    gen = torch.Generator().manual_seed(start_seed(settings.seed))
    start = time.perf_counter()
    clock.stage(name, settings.iterations * settings.restarts, limit=stage_limit)
    best: tuple[float, torch.Tensor, torch.Tensor, float | None] | None = None
    total_iters = 0
    notes: list[str] = []
    stopped = converged = False
    if not settings.learn_labels and labels is None:
        raise FedleakError("labels are needed unless they are learned")
    for restart in range(settings.restarts):
        if clock.spent() and best is not None:
            stopped = True
            break
        if settings.init == "normal":
            x0 = torch.randn(n_free, *target.input_shape, generator=gen, dtype=dtype)
        else:
            lo, hi = settings.box if settings.box is not None else (0.0, 1.0)
            x0 = lo + (hi - lo) * torch.rand(n_free, *target.input_shape, generator=gen, dtype=dtype)
        n_warm = len(warm) if warm is not None and restart == 0 else 0
        if n_warm:
            x0[:n_warm] = warm
        # the warm-started samples and the others are two leaves, so that Adam moves them at their own rates
        parts = [p.clone().requires_grad_(True) for p in (x0[:n_warm], x0[n_warm:]) if len(p)]
        step = settings.lr * settings.box_width  # Adam's steps on the inputs are in units of the box's width
        lrs = [step * settings.warm_lr, step][-len(parts):] if n_warm else [step]

        def current_x() -> torch.Tensor:
            return parts[0] if len(parts) == 1 else torch.cat(parts)

        extra: list[torch.Tensor] = []
        if settings.learn_labels:
            y_logits = torch.randn(n_free, K, generator=gen, dtype=dtype).requires_grad_(True)
            extra.append(y_logits)
        else:
            y_logits = None
            y_fixed_free = labels.long()
        log_lr = None
        if lr_mode is not None:
            refresh_lr = lr_refresher(simulate, current_x, y_logits, None if settings.learn_labels else y_fixed_free,
                                       target_norm, spent=clock.spent)
            log_lr = refresh_lr(torch.zeros((), dtype=dtype))
            if lr_mode == "learned":
                log_lr.requires_grad_(True)
                extra.append(log_lr)
        variables = parts + extra

        matched = [math.inf]  # the matching objective alone (without TV) at the last evaluation

        def loss_fn() -> torch.Tensor:
            y_free = torch.softmax(y_logits, -1) if settings.learn_labels else y_fixed_free
            x = current_x()
            loss = objective(simulate(x, y_free, log_lr))
            matched[0] = float(loss.detach())
            if settings.tv > 0:
                loss = loss + settings.tv * total_variation(x, settings.tv_boundary)
            return loss

        run_best: tuple[float, torch.Tensor, torch.Tensor | None, float | None] | None = None
        iters = 0

        def remember(value: float) -> None:
            nonlocal run_best
            if math.isfinite(value) and (run_best is None or value < run_best[0]):
                run_best = (value, current_x().detach().clone(),
                            y_logits.detach().clone() if settings.learn_labels else None,
                            float(torch.exp(log_lr.detach())) if log_lr is not None else None)

        if settings.optimizer == "adam":
            groups = [{"params": [p], "lr": lr} for p, lr in zip(parts, lrs)]
            if extra:
                groups.append({"params": extra, "lr": settings.lr})
            opt = torch.optim.Adam(groups)
            base = [g["lr"] for g in opt.param_groups]
            decay = StepDecay(settings.iterations, clock, enabled=settings.lr_decay, share=settings.restarts - restart)
            it = 0
            step_seconds = 0.0  # the last iteration's duration: one that would end past the deadline is not begun
            while not decay.finished(it):
                if clock.no_time_for(step_seconds):
                    stopped = True
                    break
                step_start = time.perf_counter()
                if lr_mode == "norm" and it % 20 == 19:
                    log_lr = refresh_lr(log_lr)
                decay.update(it)
                for g, b in zip(opt.param_groups, base):
                    g["lr"] = b * decay.factor()
                opt.zero_grad(set_to_none=True)
                loss = loss_fn()
                grads = torch.autograd.grad(loss, variables)
                for v, g in zip(variables, grads):
                    v.grad = g.sign() if (settings.signed and any(v is p for p in parts)) else g
                value = float(loss.detach())
                remember(value)
                if matched[0] < settings.stop_below:
                    converged = True
                    break
                opt.step()
                if settings.box is not None:
                    with torch.no_grad():
                        for p in parts:
                            p.clamp_(*settings.box)
                it += 1
                clock.advance(1, value)
                step_seconds = time.perf_counter() - step_start
            stopped = stopped or (it < settings.iterations and clock.spent())
            iters += it
            if not stopped:  # the last step's point (skipped when out of time: it costs one more evaluation)
                remember(float(loss_fn().detach()))
        # L-BFGS: the optimiser itself, or a refinement of the best Adam point (``refine`` evaluations)
        budget = settings.iterations if settings.optimizer == "lbfgs" else int(settings.refine)
        if budget > 0 and not stopped and not converged:
            if settings.optimizer == "adam" and run_best is not None:
                with torch.no_grad():
                    for p, b in zip(parts, run_best[1].split([len(p) for p in parts])):
                        p.copy_(b)
            lbfgs_lr = settings.lr if settings.optimizer == "lbfgs" else 1.0

            def new_lbfgs() -> torch.optim.LBFGS:
                return torch.optim.LBFGS(variables, lr=lbfgs_lr, max_iter=20, history_size=100, tolerance_grad=1e-14,
                                         tolerance_change=1e-16, line_search_fn="strong_wolfe")

            opt = new_lbfgs()
            evals = 0

            def closure() -> torch.Tensor:
                nonlocal evals, stopped, converged
                if evals >= budget:
                    raise _BudgetSpent
                if clock.spent():
                    stopped = True
                    raise _BudgetSpent
                opt.zero_grad(set_to_none=True)
                loss = loss_fn()
                grads = torch.autograd.grad(loss, variables)
                for v, g in zip(variables, grads):
                    v.grad = g
                evals += 1
                value = float(loss.detach())
                remember(value)
                clock.advance(1, value)
                if matched[0] < settings.stop_below:
                    converged = True
                    raise _BudgetSpent
                return loss

            stall = 0
            while evals < budget:
                if clock.spent():
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
                    opt = new_lbfgs()
                else:
                    stall = 0
            iters += evals
        total_iters += iters
        if run_best is not None:
            loss_value, xb, yb, lrb = run_best
            y_hard = yb.argmax(-1) if yb is not None else y_fixed_free
            if best is None or loss_value < best[0]:
                best = (loss_value, xb, y_hard, lrb)
        elif stopped and best is None:  # out of time before the first evaluation: the starting point, said so
            y_start = y_logits.detach().argmax(-1) if settings.learn_labels else y_fixed_free
            best = (math.inf, current_x().detach().clone(), y_start, None)
        if stopped or converged:
            break
    seconds = time.perf_counter() - start
    if best is None:
        raise FedleakError(f"the {name} attack produced no finite objective value (the update may be degenerate)")
    if converged:
        notes.append(f"converged: the matching objective fell below {settings.stop_below:g} after {total_iters} "
                     "iteration(s)")
    elif stopped:
        notes.append(f"stopped by the time budget after {total_iters} iteration(s) ({seconds:.1f} s)"
                     + ("; one step takes longer than the budget left, so the result is the random starting point"
                        if total_iters == 0 else ""))
    loss_value, xb, y_hard, lrb = best
    if warm is not None:  # the exact route's estimates, where they explain the update better than the search's point

        def evaluate(x_free: torch.Tensor) -> float:
            log_lr = None if lrb is None else torch.log(torch.tensor(lrb, dtype=dtype))
            loss = objective(simulate(x_free, y_hard, log_lr))
            if settings.tv > 0:
                loss = loss + settings.tv * total_variation(x_free, settings.tv_boundary)
            return float(loss.detach())

        restored_x, restored_value, restored = restore_estimates(xb, warm, evaluate)
        if restored:
            xb, loss_value = restored_x, restored_value
            notes.append(f"{restored} warm-started sample(s) set back to the estimate they started from, which "
                         "explains the update better than where the search had moved them")
    if settings.box is not None:
        xb = xb.clamp(*settings.box)
    x_all = xb if fx is None else torch.cat([fx, xb])
    y_all = y_hard if fy is None else torch.cat([fy, y_hard])
    return InversionResult(x_all.detach(), y_all.detach(), loss_value, total_iters, seconds, lrb, notes)

