"""Optimisation-based reconstruction: DLG, iDLG, Inverting Gradients, and the machinery DLM shares.

Every attack here searches for dummy inputs ``x'`` (and, for DLG, soft labels) whose *simulated* client
update matches the observed one (algorithms spec §5-§6):

* the simulated update of a FedSGD client is the mean cross-entropy gradient at the model's weights;
* the simulated update of a FedAvg client is ``W_0 - W_E``, obtained by unrolling E local SGD steps
  differentiably from the global weights ``W_0`` (``update.before``) with a *learned* learning rate,
  because the server does not know it. When E is not known it is assumed to be 1 (the whole weight
  change is treated as one aggregated gradient step); see ``docs/weight-leakage.md``.

The model is never mutated: its weights are copied and the network is evaluated with
:func:`torch.func.functional_call`, so any differentiable ``nn.Module`` works (MLP, CNN, ...).
Second-order autograd (``create_graph=True``) differentiates the simulated update w.r.t. ``x'``.

Objectives (``Σ`` runs over all parameter tensors):

* ``l2``: ``Σ‖u(x') − u*‖² / Σ‖u*‖²`` (DLG; for weight updates ``u`` carries the learned learning rate,
  which is DLM's objective with ``η`` in place of ``1/k``);
* ``normalized``: ``Σ_l ‖u_l/ν(u) − u*_l/ν(u*)‖²`` with ``ν`` the mean per-layer norm (DLM+);
* ``cosine``: ``1 − ⟨u, u*⟩/(‖u‖‖u*‖) + α·TV(x')`` (Inverting Gradients).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from fedleak.attacks.labels import class_signal, infer_label_counts, infer_labels
from fedleak.attacks.registry import register_attack
from fedleak.errors import FedleakError, ModelError, UpdateError
from fedleak.reconstruction import Reconstruction, SampleRecovery
from fedleak.updates import GradientUpdate, WeightUpdate, as_gradient_update, check_matches_model
from fedleak.validation import validate_fields

#: unrolled local optimizers the attacker can assume (the client's real optimizer is private)
UNROLL_OPTIMIZERS = ("sgd", "momentum", "adam")


# ----------------------------------------------------------------------------------------------------------
# The observed update, in a form every objective can use


@dataclass
class Target:
    """An observed update turned into per-parameter tensors (ordered like ``names``).

    ``kind`` is ``"gradient"`` (the mean-loss gradient, scale known) or ``"weights"`` (``before - after``,
    scale unknown). ``params`` are the weights at which the client computed its update (the model's own
    weights for a gradient, ``update.before`` for a weight update).
    """

    kind: str
    names: list[str]
    tensors: list[torch.Tensor]
    params: list[torch.Tensor]
    buffers: dict[str, torch.Tensor]
    batch_size: int | None
    local_steps: int | None
    input_shape: tuple[int, ...]

    @property
    def mapping(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.tensors))


def model_input_shape(model: nn.Module, input_shape: tuple[int, ...] | None) -> tuple[int, ...]:
    shape = input_shape if input_shape is not None else getattr(model, "input_shape", None)
    if shape is None:
        raise ModelError("the model does not record its input shape; pass input_shape=(C, H, W) to the attack")
    return tuple(int(s) for s in shape)


def prepare_target(
    model: nn.Module,
    update: GradientUpdate | WeightUpdate | Mapping[str, torch.Tensor],
    *,
    input_shape: tuple[int, ...] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Target:
    """Check ``update`` against ``model`` and return it as a :class:`Target` (raises ``UpdateError``)."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not named:
        raise ModelError("the model has no trainable parameters")
    names = list(named)
    shape = model_input_shape(model, input_shape)
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    if isinstance(update, WeightUpdate):
        state_names = set(model.state_dict())
        extra = sorted(set(update.before) - state_names)
        if extra:
            raise UpdateError(f"the weight update has entries the model does not have: {extra}")
        check_matches_model(model, {k: v for k, v in update.before.items() if k in named}, "weight update")
        for k in buffers:
            if k in update.before:
                if tuple(update.before[k].shape) != tuple(buffers[k].shape):
                    raise UpdateError(f"the weight update's buffer '{k}' has shape {tuple(update.before[k].shape)} "
                                      f"but the model's has {tuple(buffers[k].shape)}")
                buffers[k] = update.before[k].detach().clone()
        delta = update.delta()
        tensors = [delta[n].to(dtype) for n in names]
        if all(float(t.abs().max()) == 0 for t in tensors):
            raise UpdateError("the weight update is zero on every trainable parameter")
        params = [update.before[n].detach().to(dtype).clone() for n in names]
        return Target("weights", names, tensors, params, buffers, update.num_examples, update.local_steps, shape)
    grads = as_gradient_update(update)
    check_matches_model(model, grads.gradients, "gradient")
    tensors = [grads.gradients[n].to(dtype) for n in names]
    if all(float(t.abs().max()) == 0 for t in tensors):
        raise UpdateError("the gradient update is zero on every parameter")
    params = [named[n].detach().to(dtype).clone() for n in names]
    return Target("gradient", names, tensors, params, buffers, grads.num_examples, None, shape)


# ----------------------------------------------------------------------------------------------------------
# Functional model: gradients and unrolled local training, differentiable w.r.t. the dummy data


class FunctionalModel:
    """Evaluate ``model`` at given weights (never its own) and differentiate through its gradient."""

    def __init__(self, model: nn.Module, target: Target):
        self.model = model
        self.names = target.names
        self.buffers = target.buffers
        self.params = [p.detach().clone().requires_grad_(True) for p in target.params]

    def logits(self, params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, {**dict(zip(self.names, params)), **self.buffers}, (x,))

    def grads(self, params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """Mean cross-entropy gradient; ``y`` holds class indices or (soft) probabilities."""
        loss = nn.functional.cross_entropy(self.logits(params, x), y)
        return list(torch.autograd.grad(loss, params, create_graph=True))

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


# ----------------------------------------------------------------------------------------------------------
# Objectives


def _flat_dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    return sum((ai * bi).sum() for ai, bi in zip(a, b))


def _layer_mean_norm(ts: list[torch.Tensor]) -> torch.Tensor:
    return sum(t.norm() for t in ts) / len(ts)


class Objective:
    """A matching objective against a fixed target update; target statistics are computed once."""

    def __init__(self, target: list[torch.Tensor]):
        self.target = target
        self.sq_norm = sum(float((t * t).sum()) for t in target)
        self.mean_layer_norm = float(_layer_mean_norm(target))

    def __call__(self, sim: list[torch.Tensor]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class L2Objective(Objective):
    """``Σ‖u − u*‖² / Σ‖u*‖²`` (DLG; DLM with the learned learning rate inside ``u``)."""

    def __call__(self, sim: list[torch.Tensor]) -> torch.Tensor:
        return sum(((s - t) ** 2).sum() for s, t in zip(sim, self.target)) / max(self.sq_norm, 1e-300)


class NormalizedObjective(Objective):
    """``Σ_l ‖u_l/ν(u) − u*_l/ν(u*)‖²`` with ``ν`` the mean per-layer norm (DLM+)."""

    def __call__(self, sim: list[torch.Tensor]) -> torch.Tensor:
        ns = _layer_mean_norm(sim).clamp_min(1e-30)
        return sum(((s / ns - t / self.mean_layer_norm) ** 2).sum() for s, t in zip(sim, self.target))


class CosineObjective(Objective):
    """``1 − ⟨u, u*⟩ / (‖u‖ ‖u*‖)`` over all parameters at once (Inverting Gradients)."""

    def __call__(self, sim: list[torch.Tensor]) -> torch.Tensor:
        dot = _flat_dot(sim, self.target)
        ns = torch.sqrt(sum((s * s).sum() for s in sim)).clamp_min(1e-30)
        return 1 - dot / (ns * math.sqrt(self.sq_norm))


OBJECTIVES: dict[str, type[Objective]] = {
    "l2": L2Objective,
    "normalized": NormalizedObjective,
    "cosine": CosineObjective,
}


def total_variation(x: torch.Tensor, boundary: str = "zero") -> torch.Tensor:
    """Anisotropic total variation: mean over pixels of ``|x[i+1,j]-x[i,j]| + |x[i,j+1]-x[i,j]|``.

    ``boundary="zero"`` treats the pixels past the last row/column as 0 (the image sits on a black
    background, which also penalises bright borders; this is the convention of the Inverting Gradients
    reference code), ``"none"`` only counts differences inside the image. 0 for non-image inputs.
    """
    if x.ndim < 4:
        return x.new_zeros(())
    if boundary == "zero":
        p = nn.functional.pad(x, (0, 1, 0, 1))
        dx = (p[..., :-1, 1:] - p[..., :-1, :-1]).abs()
        dy = (p[..., 1:, :-1] - p[..., :-1, :-1]).abs()
        return (dx + dy).mean()
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


# ----------------------------------------------------------------------------------------------------------
# The shared optimisation loop


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
    unknown = set(options) - set(InversionSettings.__dataclass_fields__)
    if unknown:
        raise FedleakError(f"unknown option(s) for the {attack} attack: {sorted(unknown)}")
    values = {**defaults.__dict__, **options}
    if values.get("box") is not None:
        values["box"] = tuple(float(v) for v in values["box"])
    return InversionSettings(**values)


@dataclass
class InversionResult:
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
    """Search dummy inputs whose simulated update matches ``target`` (see the module doc).

    ``labels`` (``batch_size`` class indices) are fixed, or learned jointly as soft labels when
    ``settings.learn_labels``. ``fixed_inputs``/``fixed_labels`` are samples already known (e.g.
    certified by the exclusivity attack): they take part in the simulated update but are not optimised.
    """
    dtype = settings.torch_dtype
    fm = FunctionalModel(model, Target(target.kind, target.names, target.tensors,
                                       [p.to(dtype) for p in target.params], target.buffers,
                                       target.batch_size, target.local_steps, target.input_shape))
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


# ----------------------------------------------------------------------------------------------------------
# Building results


def batch_size_of(target: Target, requested: int | None, notes: list[str]) -> int:
    if requested is not None:
        if int(requested) < 1:
            raise FedleakError(f"batch_size must be at least 1, got {requested}")
        return int(requested)
    if target.batch_size is not None:
        return int(target.batch_size)
    notes.append("the update does not reveal its batch size: assumed 1 (pass batch_size=...)")
    return 1


def resolve_labels(
    model: nn.Module, target: Target, batch_size: int, labels: Any, notes: list[str],
    known: torch.Tensor | None = None,
) -> tuple[torch.Tensor, np.ndarray]:
    """Labels to use for the whole batch (given, or inferred from the output layer) and their counts."""
    K = None
    if labels is not None and not isinstance(labels, str):
        y = torch.as_tensor(labels).long().flatten()
        if y.numel() != batch_size:
            raise FedleakError(f"labels has {y.numel()} entries but the batch size is {batch_size}")
        notes.append("labels given by the caller")
        K = int(y.max()) + 1
        return y, np.bincount(y.numpy(), minlength=K)
    signal = class_signal(model, target.mapping)
    y = infer_labels(model, target.mapping, batch_size, known)
    counts = infer_label_counts(signal, batch_size, known) if batch_size > 1 or known is not None else \
        np.bincount(y.numpy(), minlength=signal.numel())
    rule = "iDLG's rule (the single negative output-bias entry)" if batch_size == 1 else \
        "output-layer sign/count rule"
    notes.append(f"labels inferred from the update by {rule}: {y.tolist()}")
    return y, counts


def to_reconstruction(
    name: str, result: InversionResult, target: Target, batch_size: int, counts: np.ndarray | None,
    notes: list[str], certified: torch.Tensor | None = None, samples: tuple[SampleRecovery, ...] | None = None,
) -> Reconstruction:
    n = int(result.inputs.shape[0])
    cert = certified if certified is not None else torch.zeros(n, dtype=torch.bool)
    if samples is None:
        samples = tuple(SampleRecovery(int(l), False, f"{name}: optimisation result (objective {result.loss:.3e})")
                        for l in result.labels)
    extra = [f"{name}: {result.iterations} iteration(s) in {result.seconds:.2f} s, final objective {result.loss:.3e}"]
    if result.learning_rate is not None:
        extra.append(f"{name}: learned client learning rate {result.learning_rate:.4g}")
    return Reconstruction(
        inputs=result.inputs.to(torch.float32).reshape(n, *target.input_shape),
        labels=result.labels.long(),
        certified=cert,
        attack=name,
        samples=samples,
        batch_size=batch_size,
        label_counts=counts,
        batch_certified=False,
        seconds=result.seconds,
        iterations=result.iterations,
        notes=tuple(notes + extra + result.notes),
    )


def run_optimization_attack(
    name: str,
    defaults: InversionSettings,
    model: nn.Module,
    update: Any,
    *,
    batch_size: int | None = None,
    labels: Any = None,
    input_shape: tuple[int, ...] | None = None,
    fixed_inputs: torch.Tensor | None = None,
    fixed_labels: torch.Tensor | None = None,
    **options: Any,
) -> Reconstruction:
    """Shared driver of every optimisation attack: check input, settle labels, invert, package."""
    settings = settings_from(defaults, options, name)
    target = prepare_target(model, update, input_shape=input_shape, dtype=settings.torch_dtype)
    notes: list[str] = []
    if target.kind == "weights":
        steps = settings.local_steps or target.local_steps
        if steps is None:
            notes.append("the number of local steps is unknown: the weight change is treated as one aggregated "
                         "SGD step at the global weights (learning rate learned)")
        else:
            notes.append(f"{steps} local {settings.client_optimizer} step(s) unrolled differentiably "
                         "(learning rate learned)")
    m = batch_size_of(target, batch_size, notes)
    if fixed_inputs is not None and len(fixed_inputs) >= m:
        raise FedleakError(f"{len(fixed_inputs)} known sample(s) already fill the batch of {m}")
    counts: np.ndarray | None = None
    free_labels = None
    if settings.learn_labels:
        notes.append("labels learned jointly with the data (soft labels, DLG)")
    else:
        y, counts = resolve_labels(model, target, m, labels, notes, known=fixed_labels)
        if fixed_labels is not None and len(fixed_labels):
            rest = torch.from_numpy(counts.copy())
            known = torch.bincount(fixed_labels.long(), minlength=len(rest))[: len(rest)]
            rest = (rest - known).clamp_min(0)
            free_labels = torch.repeat_interleave(torch.arange(len(rest)), rest).long()
            need = m - len(fixed_labels)
            if len(free_labels) != need:  # keep the count consistent with the batch
                free_labels = torch.cat([free_labels, y[: max(0, need - len(free_labels))]])[:need]
        else:
            free_labels = y
    result = invert(model, target, settings, batch_size=m, labels=free_labels, fixed_inputs=fixed_inputs,
                    fixed_labels=fixed_labels, name=name)
    if settings.learn_labels:
        counts = np.bincount(result.labels.numpy(), minlength=1)
    return to_reconstruction(name, result, target, m, counts, notes)


# ----------------------------------------------------------------------------------------------------------
# The attacks

DLG_DEFAULTS = InversionSettings(objective="l2", optimizer="lbfgs", lr=1.0, iterations=300, init="normal",
                                 box=None, learn_labels=True)
IDLG_DEFAULTS = InversionSettings(objective="l2", optimizer="lbfgs", lr=1.0, iterations=300, init="normal",
                                  box=None, learn_labels=False)
IG_DEFAULTS = InversionSettings(objective="cosine", optimizer="adam", lr=0.1, iterations=1000, tv=1e-4,
                                signed=True, box=(0.0, 1.0), lr_decay=True, init="uniform", restarts=1)


@register_attack("dlg", update_kinds=("gradient", "weights"),
                 description="Deep Leakage from Gradients: L2 gradient matching, data and soft labels, L-BFGS")
def dlg_attack(model: nn.Module, update: Any, **options: Any) -> Reconstruction:
    """DLG (Zhu et al. 2019): jointly optimise dummy data and soft labels to match the update in L2.

    Options: ``batch_size``, ``input_shape`` and the fields of :class:`InversionSettings`
    (``iterations``, ``time_budget``, ``progress``, ``seed``, ...). On a weight update the client's
    learning rate is learned (and its local steps unrolled when known).
    """
    return run_optimization_attack("dlg", DLG_DEFAULTS, model, update, **options)


@register_attack("idlg", update_kinds=("gradient", "weights"),
                 description="improved DLG: labels read from the output layer, then L2 matching with L-BFGS")
def idlg_attack(model: nn.Module, update: Any, **options: Any) -> Reconstruction:
    """iDLG (Zhao et al. 2020): the label comes analytically from the output layer (the count rule for a
    batch), then DLG's L2 matching of the data only. Options as :func:`dlg_attack`, plus ``labels``."""
    return run_optimization_attack("idlg", IDLG_DEFAULTS, model, update, **options)


@register_attack("ig", update_kinds=("gradient", "weights"),
                 description="Inverting Gradients: cosine matching + total variation, signed Adam, box, restarts")
def ig_attack(model: nn.Module, update: Any, **options: Any) -> Reconstruction:
    """Inverting Gradients (Geiping et al. 2020): ``1 - cos(u(x'), u*) + tv * TV(x')`` minimised by Adam
    on the sign of the gradient, step-decayed, with ``x'`` clamped to ``box``; ``restarts`` runs are
    scored by their objective. Labels are inferred (or given). Options as :func:`dlg_attack`."""
    return run_optimization_attack("ig", IG_DEFAULTS, model, update, **options)
