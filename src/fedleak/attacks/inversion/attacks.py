"""DLG, iDLG and Inverting Gradients, and the driver every optimisation attack (DLM too) shares.

:func:`run_optimization_attack` checks the input, settles batch size and labels, runs
:func:`~fedleak.attacks.inversion.search.invert` and packages the result as a :class:`Reconstruction`.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from fedleak.attacks.defense_aware import defense_stack
from fedleak.attacks.defense_forward import forward_model, search_notes
from fedleak.attacks.inversion.clock import RunClock
from fedleak.attacks.inversion.prior import Prior, place_estimates
from fedleak.attacks.inversion.search import InversionResult, invert
from fedleak.attacks.inversion.settings import InversionSettings, settings_from
from fedleak.attacks.inversion.target import Target, batch_size_of, prepare_target, resolve_labels
from fedleak.attacks.labels import reads_classes
from fedleak.attacks.read_defense import read_defense
from fedleak.attacks.registry import register_attack
from fedleak.defenses.stack import DefenseStack
from fedleak.errors import FedleakError
from fedleak.nets.output_layer import output_layer_names
from fedleak.reconstruction import Reconstruction, SampleRecovery


def optimised_reason(name: str, why: str, objective: float) -> str:
    """Why an optimised sample is not certified: ``why`` it is not known otherwise, then how it was searched."""
    searched = (f"optimised by {name.upper()} (final objective {objective:.2e}), not certified"
                if math.isfinite(objective) else
                f"not optimised: {name.upper()} had no time for one step within the budget (a random starting "
                "point, not certified)")
    return f"{why}; {searched}" if why else f"{searched}: an optimisation result carries no proof"


def to_reconstruction(
    name: str, result: InversionResult, target: Target, batch_size: int, counts: np.ndarray | None,
    notes: list[str], certified: torch.Tensor | None = None, samples: tuple[SampleRecovery, ...] | None = None,
    reasons: tuple[str, ...] | None = None,
) -> Reconstruction:
    """Package a search result; ``reasons``: per sample, why it is not known otherwise (see
    :func:`optimised_reason`)."""
    n = int(result.inputs.shape[0])
    cert = certified if certified is not None else torch.zeros(n, dtype=torch.bool)
    if samples is None:
        why = reasons if reasons is not None and len(reasons) == n else ("",) * n
        samples = tuple(SampleRecovery(int(l), False, optimised_reason(name, w, result.loss), route=name)
                        for l, w in zip(result.labels, why))
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
    prior: Prior | None = None,
    clock: RunClock | None = None,
    data_range: tuple[float, float] | None = None,
    **options: Any,
) -> Reconstruction:
    """Shared driver of every optimisation attack: check input, settle labels, invert, package.

    ``fixed_inputs`` / ``fixed_labels``: samples known exactly, held fixed in the simulated update. ``prior``:
    what else is known (:class:`~fedleak.attacks.inversion.prior.Prior`: estimates to start from, label
    counts, why the rest is unknown). ``clock``: the run's :class:`~fedleak.attacks.inversion.clock.RunClock`
    when this search is one stage of a longer run (``auto``). Option ``defense``: the client's defenses (a
    :class:`~fedleak.defenses.DefenseStack`, a defense, a spec ``"top-k:ratio=0.1"`` or a list): the simulated
    update goes through their forward model before it is matched (:mod:`fedleak.attacks.defense_forward`); not given,
    the clipping a gradient shows is modelled (:mod:`fedleak.attacks.read_defense`), and ``"none"`` models nothing.
    ``data_range``: the range the client's inputs live on, the box of a boxed search (IG, DLM, DLM+; see
    :func:`~fedleak.attacks.inversion.settings.settings_from`).
    """
    declared = options.pop("defense", None)
    stack = defense_stack(declared)
    settings = settings_from(defaults, options, name, data_range)
    target = prepare_target(model, update, input_shape=input_shape, dtype=settings.torch_dtype)
    notes: list[str] = []
    if data_range is None and "box" not in options and settings.box is not None:
        lo, hi = settings.box
        notes.append(f"the search keeps its inputs in [{lo:g}, {hi:g}], its default box: for inputs on another range "
                     "(normalised data) pass the data's range, data_range=(low, high)")
    if declared is None and target.kind == "gradient":  # not declared (defense="none" declares no defense)
        stack = read_clip_stack(target.mapping, notes)
    if target.kind == "weights":
        steps = settings.local_steps or target.local_steps
        if steps is None:
            notes.append("the number of local steps is unknown: the weight change is treated as one aggregated "
                         "SGD step at the global weights (learning rate learned)")
        else:
            notes.append(f"{steps} local {settings.client_optimizer} step(s) unrolled differentiably "
                         "(learning rate learned)")
    m = batch_size_of(model, target, batch_size, notes)
    if not (settings.learn_labels or labels is not None or reads_classes(model, target.mapping)):
        settings = replace(settings, learn_labels=True)  # no output-layer gradient to read them from
        notes.append(f"the update holds nothing of the output layer '{output_layer_names(model)[0]}' (frozen, "
                     "as FedBABU's clients keep it), from which labels are read otherwise")
    n_known = 0 if fixed_inputs is None else len(fixed_inputs)
    if n_known >= m:
        raise FedleakError(f"{n_known} known sample(s) already fill the batch of {m}")
    counts: np.ndarray | None = None
    free_labels = given = None
    if settings.learn_labels:
        notes.append("labels learned jointly with the data (soft labels, DLG)")
    else:
        given = labels
        if labels is None and prior is not None and prior.label_counts is not None \
                and int(prior.label_counts.sum()) == m:
            given = torch.repeat_interleave(torch.arange(len(prior.label_counts)),
                                            torch.as_tensor(prior.label_counts, dtype=torch.long))
        y, counts = resolve_labels(model, target, m, given, notes, known=fixed_labels,
                                   class_weights=settings.class_weights)
        if labels is None and given is None and settings.label_smoothing:
            notes.append("the label rule reads the update as a plain cross-entropy's; the client's label smoothing "
                         "may shift it (pass labels where they are known)")
        if given is not None and labels is None:
            notes[-1] = f"labels from the label counts known beforehand (the prior): {y.tolist()}"
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
    place = place_estimates(prior, free_labels) if free_labels is not None else None
    if place is not None:
        free_labels = place.labels
        if place.num_warm:
            notes.append(f"{place.num_warm} sample(s) started from the estimates given (learning rate x "
                         f"{settings.warm_lr:g})")
    notes.extend(search_notes(stack, labels_inferred=not settings.learn_labels and labels is None and given is None,
                              unboxed=settings.box is None or settings.optimizer == "lbfgs"))
    result = invert(model, target, settings, batch_size=m, labels=free_labels, fixed_inputs=fixed_inputs,
                    fixed_labels=fixed_labels, warm_start=None if place is None else place.warm, name=name,
                    clock=clock, forward=forward_model(stack, target.names, target.mapping))
    if settings.learn_labels:
        counts = np.bincount(result.labels.numpy(), minlength=1)
    why = ("",) * n_known + (place.reasons if place is not None else
                             ((prior.reason if prior is not None else ""),) * (m - n_known))
    return to_reconstruction(name, result, target, m, counts, notes, reasons=why)


def read_clip_stack(observed: dict[str, torch.Tensor], notes: list[str]) -> DefenseStack:
    """The clipping a gradient shows (:func:`fedleak.attacks.read_defense.read_defense`), as the defense of a client
    that declared none (a note says so); else no defense."""
    read = read_defense(observed)
    if read is None:
        return DefenseStack.of(None)
    notes.append(f"{read.evidence}: the simulated gradients go through {read.defense.label} alike (defense-aware)")
    return DefenseStack.of(read.defense)


# ----------------------------------------------------------------------------------------------------------
# The attacks

DLG_DEFAULTS = InversionSettings(objective="l2", optimizer="lbfgs", lr=1.0, iterations=300, init="normal",
                                 box=None, learn_labels=True)
IDLG_DEFAULTS = InversionSettings(objective="l2", optimizer="lbfgs", lr=1.0, iterations=300, init="normal",
                                  box=None, learn_labels=False)
IG_DEFAULTS = InversionSettings(objective="cosine", optimizer="adam", lr=0.1, iterations=1000, tv=1e-4,
                                signed=True, box=(0.0, 1.0), lr_decay=True, init="uniform", restarts=1)


@register_attack("dlg", update_kinds=("gradient", "weights"), takes_defense=True, optimises=True, takes_loss=True,
                 description="Deep Leakage from Gradients: L2 gradient matching, data and soft labels, L-BFGS")
def dlg_attack(model: nn.Module, update: Any, **options: Any) -> Reconstruction:
    """DLG (Zhu et al. 2019): jointly optimise dummy data and soft labels to match the update in L2.

    Options: ``batch_size``, ``input_shape`` and the fields of :class:`InversionSettings`
    (``iterations``, ``time_budget``, ``progress``, ``seed``, ...). On a weight update the client's
    learning rate is learned (and its local steps unrolled when known).
    """
    return run_optimization_attack("dlg", DLG_DEFAULTS, model, update, **options)


@register_attack("idlg", update_kinds=("gradient", "weights"), takes_defense=True, optimises=True, takes_loss=True,
                 description="improved DLG: labels read from the output layer, then L2 matching with L-BFGS")
def idlg_attack(model: nn.Module, update: Any, **options: Any) -> Reconstruction:
    """iDLG (Zhao et al. 2020): the label comes analytically from the output layer (the count rule for a
    batch), then DLG's L2 matching of the data only. Options as :func:`dlg_attack`, plus ``labels``."""
    return run_optimization_attack("idlg", IDLG_DEFAULTS, model, update, **options)


@register_attack("ig", update_kinds=("gradient", "weights"), takes_defense=True, optimises=True, reads_range=True,
                 takes_loss=True,
                 description="Inverting Gradients: cosine matching + total variation, signed Adam, box, restarts")
def ig_attack(model: nn.Module, update: Any, **options: Any) -> Reconstruction:
    """Inverting Gradients (Geiping et al. 2020): ``1 - cos(u(x'), u*) + tv * TV(x')`` minimised by Adam
    on the sign of the gradient, step-decayed, with ``x'`` clamped to ``box`` (the data's range ``data_range``
    where given, else [0, 1]); ``restarts`` runs are scored by their objective. Labels are inferred (or given).
    Options as :func:`dlg_attack`, plus ``data_range``."""
    return run_optimization_attack("ig", IG_DEFAULTS, model, update, **options)
