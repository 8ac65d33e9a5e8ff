"""``attack="auto"``: the strongest applicable attack on any model fedleak reads, exact route first, within a
time budget.

1. **Route** (:mod:`~fedleak.attacks.auto.route`). The certified exclusivity attack (MLPs and CNNs) runs when
   :func:`fedleak.nets.as_network` reads the model with a hidden ReLU layer in its dense head and the update is
   a FedSGD gradient or a one-step FedAvg weight change (local steps 1 or not declared: for one step
   ``ΔW = η ∇W`` and the unknown learning rate cancels in every ratio ``ΔW_i / Δb_i``; its certificate rejects
   what several steps would corrupt). Otherwise (several local steps declared, a residual or LayerNorm model,
   no hidden ReLU layer, ...) it is skipped and the notes say why; a gradient of one sample is then read from
   the model's first Linear layer (:mod:`fedleak.attacks.first_layer`), which settles the run where it certifies;
   of a batch, and of a weight change (one local step or several) where the exact route certified only part of
   it, the inputs that layer's rows give (:mod:`fedleak.attacks.first_layer_rows`, uncertified) are held; so are
   they of a gradient the exact route certified only part of (a trained model's samples classified with probability
   1, whose rows it cannot read), and a one-sample gradient it did not certify is read from that layer, certified.
2. **Optimisation for the rest** (:mod:`~fedleak.attacks.auto.assemble`). The certified samples are kept
   exactly and held fixed; DLM+ (weight updates, local steps unrolled) or Inverting Gradients (gradients)
   searches the others, starting from what the exact route knows: their labels discounted from its label
   counts, the inputs it rebuilt without a certificate as starting points.
3. **Budget** (``budget`` seconds, default :data:`DEFAULT_BUDGET`; the optimisation gets what the exact route
   leaves) and one progress bar on stderr (``progress=False`` turns it off) that shows the route and the
   seconds left.

Every sample says which route produced it (``SampleRecovery.route``: ``"exclusivity (certified)"``,
``"dlm+"``, ``"ig"``) and, uncertified, why in its ``reason``; never more samples than the batch.
``Reconstruction.attack`` names the routes taken (``"auto:exclusivity"``, ``"auto:exclusivity+dlm+"``,
``"auto:ig"``, ...).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from torch import nn

from fedleak.attacks.auto.route import (
    OPTIMISATION_ROUTES,
    RoutePlan,
    exact_route_barrier,
    exact_route_reason,
    network_barrier,
    plan_route,
)
from fedleak.attacks.auto.stages import finish, first_layer_rows, run_exact, run_first_layer
from fedleak.attacks.exact import exclusivity_on_weights
from fedleak.attacks.exact.options import resolve_options
from fedleak.attacks.inversion import InversionSettings, RunClock
from fedleak.attacks.registry import register_attack
from fedleak.errors import OptionError
from fedleak.option_fields import options_from
from fedleak.reconstruction import Reconstruction
from fedleak.updates import WeightUpdate, as_gradient_update, check_matches_model
from fedleak.validation import check_float, check_int
from fedleak.weight_change import OTHER_SIGN, other_sign

#: seconds ``auto`` takes by default, exact route and optimisation together (see docs/weight-leakage.md)
DEFAULT_BUDGET = 60.0
#: what the client did, as both routes read it: its loss (label smoothing, class weights, a focal loss), its defenses
#: and the range its inputs live on (the exact route's tolerances, the search's box)
CLIENT_OPTIONS = ("label_smoothing", "class_weights", "focal_gamma", "defense", "data_range")


@register_attack("auto", update_kinds=("gradient", "weights"), optimises=True, takes_defense=True, reads_range=True,
                 takes_loss=True,
                 description="exact exclusivity route where it applies, then DLM+ (weights) / IG (gradients)")
def auto_attack(
    model: nn.Module,
    update: Any,
    *,
    input_shape: tuple[int, ...] | None = None,
    batch_size: int | None = None,
    budget: float | None = DEFAULT_BUDGET,
    progress: bool = True,
    exclusivity_options: dict[str, Any] | None = None,
    **options: Any,
) -> Reconstruction:
    """Run the exact exclusivity attack where it applies, then optimise what it did not certify.

    ``budget``: seconds for the whole run (default :data:`DEFAULT_BUDGET`; ``None``: no limit); the exact
    route runs first and the optimisation gets what is left. ``progress``: a tqdm bar on stderr that shows the
    route and the seconds left. ``options`` go to the optimisation attack (DLM+ for weight updates, IG for
    gradients: ``iterations``, ``time_budget`` (a further limit on that stage), ``seed``, ...);
    ``exclusivity_options`` to the exclusivity attack (unless they say otherwise it skips feature matching,
    ``fallback="none"``, as the optimisation searches those samples instead, and returns at most the batch
    size, ``beyond_batch=False``). What the client did goes to both routes: its loss (``label_smoothing``,
    ``class_weights``, ``focal_gamma``), its defenses (``defense``: under per-sample clipping of a known bound the
    exact route still certifies) and the range its inputs live on (``data_range``, e.g. ``(-1, 1)`` for data
    normalised with mean and std 0.5: the search keeps its inputs in it, [0, 1] where it is not given).
    """
    if budget is not None:
        budget = check_float("budget", budget, low=0.0, error=OptionError)
        if budget <= 0:
            raise OptionError(f"budget must be positive seconds (or None for no limit), got {budget}")
    if not isinstance(progress, bool):
        raise OptionError(f"progress must be True or False, got {progress!r}")
    if batch_size is not None:
        batch_size = check_int("batch_size", batch_size, low=1, error=OptionError)
    check_search_options(options)
    if not isinstance(update, WeightUpdate):
        update = as_gradient_update(update)
    # a mismatched update is bad input: said before any route starts or any progress bar is drawn
    if isinstance(update, WeightUpdate):
        update.parameters_of(model)
    else:
        check_matches_model(model, update.gradients)
    for k in [k for k in CLIENT_OPTIONS if k in options and options[k] is None]:
        del options[k]  # not given: the exact route's default (label smoothing read off the update), the search's 0
    client = {k: options[k] for k in CLIENT_OPTIONS if k in options}  # both routes take them
    exact_opts = resolve_options(None, {"fallback": "none", "beyond_batch": False, **client,
                                        **(exclusivity_options or {})})
    with RunClock(budget, progress=progress, label="auto") as clock:
        plan = plan_route(model, update, input_shape)
        notes = list(plan.notes)
        exact = None
        if plan.runs_exact:
            clock.stage("exclusivity")
            exact = run_exact(model, update, input_shape, exact_opts, notes)
            if exact is not None and OTHER_SIGN in exact.notes:  # its certificates settled a change's sign
                update = other_sign(update)
            exact = first_layer_rows(model, update, exact, input_shape, notes)
            if exact is not None and exact.attack == "auto:first-layer":  # a one-sample gradient, settled
                return exact
            clock.advance()
        else:
            one = run_first_layer(model, update, input_shape, notes)
            if one is not None and one.batch_certified:
                return one
            exact = one  # a batch's first-layer rows (uncertified), held in the search
        return finish(model, update, plan, exact, clock, notes, input_shape, batch_size, budget, options)


#: what the search takes beside its settings (:class:`~fedleak.attacks.inversion.InversionSettings`)
SEARCH_ARGUMENTS = ("labels", "defense", "data_range")
#: auto's own options, beside the search's
OWN_OPTIONS = ("batch_size", "budget", "exclusivity_options", "input_shape", "progress")


def check_search_options(options: dict[str, Any]) -> None:
    """The options for the search, checked before any route runs: a typo, or a value the search would refuse, is
    refused even where the exact route settles the batch and the search never starts."""
    known = sorted({f.name for f in fields(InversionSettings)} | set(SEARCH_ARGUMENTS) | set(OWN_OPTIONS))
    unknown = sorted(k for k in options if k not in known)
    if unknown:
        raise OptionError(f"unknown auto option(s): {unknown}; known: {known}")
    options_from(InversionSettings, {k: v for k, v in options.items() if k not in SEARCH_ARGUMENTS},
                 error=OptionError, what="auto option")


__all__ = ["DEFAULT_BUDGET", "OPTIMISATION_ROUTES", "RoutePlan", "auto_attack", "exact_route_barrier",
           "exact_route_reason", "exclusivity_on_weights", "network_barrier", "plan_route", "run_exact"]
