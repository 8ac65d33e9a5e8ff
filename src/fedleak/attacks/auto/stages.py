"""``auto``'s stages after the route is planned: the exact route, then the search for the rest."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from fedleak.attacks.auto.assemble import (
    anchored_indices,
    certified_indices,
    exact_part,
    held_indices,
    merge,
    prior_from,
)
from fedleak.attacks.auto.route import RoutePlan
from fedleak.attacks.exact import exclusivity_attack, exclusivity_on_weights
from fedleak.attacks.exact.options import ExclusivityOptions
from fedleak.attacks.inversion import RunClock
from fedleak.attacks.registry import get_attack
from fedleak.errors import FedleakError, ModelError, OptionError, UpdateError
from fedleak.reconstruction import Reconstruction
from fedleak.updates import WeightUpdate

#: the search stops once its objective is below this (the update matched to float32 precision), unless told otherwise
STOP_BELOW = 1e-9


def run_exact(model: nn.Module, update: Any, input_shape: tuple[int, ...] | None, opts: ExclusivityOptions,
              notes: list[str]) -> Reconstruction | None:
    """The exclusivity attack on a gradient or a one-step weight change; None (and a note) when it cannot run."""
    try:
        if isinstance(update, WeightUpdate):
            return exclusivity_on_weights(model, update, input_shape=input_shape, options=opts)
        return exclusivity_attack(model, update, input_shape=input_shape, options=opts)
    except (UpdateError, OptionError):
        raise  # the update does not fit the model, or a bad option: the user's to fix
    except FedleakError as exc:
        notes.append(f"auto: the exclusivity attack could not run ({exc})")
        return None


def run_first_layer(model: nn.Module, update: Any, input_shape: tuple[int, ...] | None, notes: list[str],
                    ) -> Reconstruction | None:
    """The first Linear layer's reading: of a one-sample gradient, its result when it certifies the sample (the run
    is then settled: ``batch_certified``); of a batch's gradient or of a weight change, the inputs its rows give
    (uncertified, :mod:`fedleak.attacks.first_layer_rows`) where it gives any; else None and a note saying why."""
    try:
        one = get_attack("first-layer").run(model, update, input_shape=input_shape)
    except (UpdateError, OptionError):
        raise
    except FedleakError as exc:
        notes.append(f"auto: the first-layer attack could not run ({exc})")
        return None
    batch = isinstance(update, WeightUpdate) or update.num_examples != 1
    if len(one) and (batch or (not one.batch_certified and held_indices(one))):
        return one  # a batch's rows, or one sample's to a rounded update's precision: held as they are
    if not one.batch_certified:
        why = one.samples[0].reason if one.samples else one.missing_reason
        notes.append(f"auto: the first-layer attack {'rebuilt' if batch else 'certified'} nothing ({why})")
        if not batch and len(one):  # what the layer read: where the search starts that sample
            notes.append("auto: the search starts from the input the first Linear layer read")
            return one
        return None
    notes.append("auto: a one-sample gradient; its first Linear layer gives the sample, certified by the whole update")
    return replace(one, attack="auto:first-layer", notes=(*notes, *one.notes))


def first_layer_rows(model: nn.Module, update: Any, exact: Reconstruction | None,
                     input_shape: tuple[int, ...] | None, notes: list[str]) -> Reconstruction | None:
    """Where the exact route certified only part of the batch and held nothing else, the first Linear layer's
    reading: of a one-sample gradient, the sample certified by the whole update (a sample classified with
    probability 1, whose rows the exact route cannot read, say); of a batch's gradient or of a weight change (one
    local step or several, declared or not), the inputs its rows give, held after the certified samples (those they
    repeat left out), the exact route's other inputs still starting the search; else ``exact``. Where they give
    nothing of an undeclared weight change (on two classes, read as several steps) and the exact route certified
    part of it, which a gradient at the weights sent explains, they are read as one step's (class fit and common
    scale). (Of a gradient at initialisation the rows gave no sample the exact route had not certified; of a trained
    model's, they give the samples it classifies with probability 1: on an MLP trained on LFW, 55 of 140 samples in
    batches of 4-16, each exactly, in about 0.1 s.)"""
    weights = isinstance(update, WeightUpdate)
    sure = anchored_indices(exact) if exact is not None else []  # certified, or but for an unexcluded blend
    m = update.num_examples
    if exact is not None and (len(held_indices(exact)) > len(sure) or exact.batch_certified
                              or (m is not None and len(certified_indices(exact)) >= m)):
        return exact
    rows = run_first_layer(model, update, input_shape, notes)
    if rows is not None and rows.batch_certified:
        return rows  # a one-sample gradient, settled
    if rows is None and sure and weights and update.local_steps is None:
        update = replace(update, local_steps=1)  # what the certified samples show of it: one step at the weights sent
        rows = run_first_layer(model, update, input_shape, notes)
        if rows is not None:
            notes.append(f"auto: the first Linear layer's rows read as one local step's, since the exact route "
                         f"read {len(sure)} sample(s) of the change as one step's gradient")
    if rows is None:
        return exact
    what = ("weight change" + ("" if update.local_steps == 1 else ", which over several local steps still give "
                               "inputs,")) if weights else "gradient"
    # inputs read off the rows of a compressed update are not exact: they start the search instead of being held
    how = "held" if len(held_indices(rows)) == len(rows) else "starting the search (their reasons say why)"
    if exact is None or not len(exact):
        notes.append(f"auto: the exact route certified nothing; the first Linear layer's rows of the {what} gave "
                     f"{len(rows)} (uncertified), {how}")
        notes.extend(f"{exact.attack}: {n}" for n in (exact.notes if exact is not None else ()))
        return rows
    repeated, read = _near(rows.inputs, exact.inputs[sure]), _near(exact.inputs, rows.inputs)
    new = [k for k in range(len(rows)) if not repeated[k]]
    others = [k for k in range(len(exact)) if k not in sure and not read[k]]
    certified = len(certified_indices(exact))
    said = f"certified {certified or 'nothing'}"
    if len(sure) > certified:  # samples read as certifiable but for a blend the scale cannot exclude
        extra = len(sure) - certified
        said = (f"certified {certified} and read {extra} more exactly" if certified
                else f"read {extra} exactly, uncertified")
    notes.append(f"auto: the exact route {said}; the first Linear layer's rows of the {what} gave {len(new)}"
                 f"{' more' if sure else ''} (uncertified), {how}")
    notes.extend(f"{r.attack}: {n}" for r in (exact, rows) for n in r.notes)  # each under its own name
    parts = [(exact, sure), (rows, new), (exact, others)]
    index = [torch.tensor(k, dtype=torch.long) for _, k in parts]
    return replace(exact, attack="exclusivity+first-layer" if sure else rows.attack, notes=(),
                   inputs=torch.cat([r.inputs[i].to(exact.inputs.dtype) for (r, _), i in zip(parts, index)]),
                   labels=torch.cat([r.labels[i] for (r, _), i in zip(parts, index)]),
                   certified=torch.cat([r.certified[i] for (r, _), i in zip(parts, index)]),
                   samples=tuple(r.samples[k] for r, ks in parts for k in ks))


def _near(a: torch.Tensor, b: torch.Tensor) -> list[bool]:
    """Per row of ``a``, whether it is within 1e-4 (relative) of a row of ``b``: the same input read twice."""
    if not len(a) or not len(b):
        return [False] * len(a)
    fa, fb = a.reshape(len(a), -1).double(), b.reshape(len(b), -1).double()
    return (torch.cdist(fa, fb) <= 1e-4 * fb.norm(dim=1)[None, :]).any(1).tolist()


def search_rest(name: str, model: nn.Module, update: Any, **kwargs: Any) -> Reconstruction:
    """Run the optimisation attack ``name`` (looked up in the attack registry)."""
    return get_attack(name).run(model, update, **kwargs)


def _range_of_held(held: torch.Tensor, notes: list[str]) -> dict[str, tuple[float, float]]:
    """Where the inputs the exact route holds leave the search's default box [0, 1], the data's range is not that
    box: the search is given the least range that holds them and [0, 1] (a note says so)."""
    lo, hi = float(held.min()), float(held.max())
    if lo >= 0.0 and hi <= 1.0:
        return {}
    wide = (min(lo, 0.0), max(hi, 1.0))
    notes.append(f"auto: the inputs the exact route rebuilt lie in [{lo:.4g}, {hi:.4g}], beyond the search's default "
                 f"box [0, 1]: it searches in [{wide[0]:.4g}, {wide[1]:.4g}] (data_range=(low, high) sets the data's "
                 "range)")
    return {"data_range": wide}


def finish(model: nn.Module, update: Any, plan: RoutePlan, exact: Reconstruction | None, clock: RunClock,
           notes: list[str], input_shape: tuple[int, ...] | None, batch_size: int | None, budget: float | None,
           options: dict[str, Any]) -> Reconstruction:
    """Everything after the exact route: stop where it settled the batch, else search the rest."""
    name = plan.optimiser
    m = batch_size
    if m is None and exact is not None and exact.batch_size is not None:
        m = exact.batch_size
    if m is None:
        m = update.num_examples
    fixed = held_indices(exact) if exact is not None else []  # certified, or rebuilt read in training mode
    sure = len(certified_indices(exact)) if exact is not None else 0
    trained = len(fixed) - sure
    if exact is not None:
        unit = "gradient" if not isinstance(update, WeightUpdate) else "weight change (learning rate cancels in " \
            f"ΔW_i/Δb_i{', over any number of local steps' if exact.attack == 'first-layer' else ''})"
        notes.append(f"auto: {exact.attack} attack on the {unit} in {exact.seconds:.2f} s: {sure} sample(s) "
                     "certified exact" + (f" of a batch of {m}" if m is not None else " (batch size unknown)"))
        notes.extend(f"{exact.attack}: {n}" for n in exact.notes)
        if trained:  # read exactly off the update's rows (:func:`~fedleak.attacks.auto.assemble.held_indices`)
            notes.append(f"auto: {trained} input(s) the {exact.attack} attack read exactly off the update's rows "
                         "without a certificate (their reasons say why) are held as they are")
        whole = bool(fixed) and ((exact.batch_certified and not trained) or (m is not None and len(fixed) >= m))
        if whole:
            notes.append("auto: every sample certified by the exclusivity attack; no optimisation needed" if not trained
                         else f"auto: every sample of the batch comes from the {exact.attack} attack; no "
                         "optimisation needed")
            return exact_part(exact, m, notes, held_only=True)
        if fixed and m is None:
            which = "the certified samples" if not trained else f"the {exact.attack} attack's samples"
            notes.append("auto: the batch size is unknown, so it is unknown whether samples are missing: returning "
                         f"{which} only (pass batch_size=... to search for the rest)")
            return exact_part(exact, m, notes, held_only=True)
        if clock.spent():
            why = f"the time budget of {budget:g} s was spent by the exact route"
            notes.append(f"auto: {why}")
            return exact_part(exact, m, notes, why)
    prior = prior_from(exact, plan.exact_skipped)
    if exact is not None and fixed and options.get("data_range") is None and "box" not in options:
        options = {**options, **_range_of_held(exact.inputs[fixed], notes)}
    shape = input_shape if input_shape is not None or exact is None else tuple(exact.inputs.shape[1:])
    try:
        rest = search_rest(name, model, update, input_shape=shape, batch_size=m,
                           fixed_inputs=exact.inputs[fixed] if fixed else None,
                           fixed_labels=exact.labels[fixed] if fixed else None,
                           prior=prior, clock=clock, **{"stop_below": STOP_BELOW, **options})
    except ModelError as exc:
        if exact is None or len(exact) == 0:
            raise
        why = f"{name} could not search for the other samples ({exc})"
        notes.append(f"auto: {why}")
        return exact_part(exact, m, notes, why)
    if fixed:
        held = "certified exact" if not trained else f"{sure} certified exact, {trained} read off its rows"
        notes.append(f"auto: {len(fixed)} sample(s) come from the {exact.attack} attack ({held}); "
                     f"{len(rest) - len(fixed)} more from {name}, optimised with those held fixed")
    elif exact is not None:
        notes.append(f"auto: nothing certified; every sample comes from {name}")
    return merge(exact, rest, name, notes)
