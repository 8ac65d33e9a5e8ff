"""The exact route's verdict in one line, from the plan's counts, and the plan of a model the route cannot read."""

from __future__ import annotations

from dataclasses import replace

from fedleak.plan.advice import RouteFacts, advise
from fedleak.plan.proof import ProofCheck
from fedleak.plan.result import (
    ROUTE_APPLIES,
    ROUTE_CANNOT,
    ROUTE_PARTIAL,
    ROUTE_UNPROVEN,
    STATUS_UNDERDETERMINED,
    STATUS_UNPROVEN,
    BatchEstimate,
    ConvBlockPlan,
    Evidence,
    Plan,
    layer_label,
    peeling_clause,
)


def _names(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def route(blocks: tuple[ConvBlockPlan, ...], at: BatchEstimate, kind, target: float, proof: ProofCheck
          ) -> tuple[str, str]:
    """The route's verdict at ``at.batch_size`` and the clause that says why it does not fully apply."""
    if kind is not None and not kind.exact_route_possible:
        return ROUTE_CANNOT, f"the update is a {kind.summary()}"
    under = [b for b in blocks if b.status == STATUS_UNDERDETERMINED]
    if under:
        detail = "; ".join(f"{layer_label(b.name)}: median {b.equations_median:g} equations for {b.unknowns} unknowns"
                           for b in reversed(under))
        verb = "is" if len(under) == 1 else "are"
        names = _names([layer_label(b.name) for b in under])
        return ROUTE_CANNOT, f"{names} {verb} underdetermined at any batch size ({detail})"
    pct = f"{100 * at.fraction:.0f}%"
    limit = f" ({layer_label(at.limited_by)} limits it)" if at.limited_by else ""
    if at.fraction < target:
        if at.fraction > 0:
            return ROUTE_PARTIAL, f"at batch {at.batch_size} only about {pct} of the samples meet its condition{limit}"
        return ROUTE_CANNOT, f"at batch {at.batch_size} no sample meets its condition{limit}"
    unproven = [b for b in blocks if b.status == STATUS_UNPROVEN]
    if unproven:
        names = _names([layer_label(b.name) for b in unproven])
        if proof.ran:
            return ROUTE_UNPROVEN, (f"{names} {'has' if len(unproven) == 1 else 'have'} enough equations, but the "
                                    f"attack's proof failed on some of {proof.samples} inputs tried")
        return ROUTE_UNPROVEN, f"{names}: enough equations, but the attack's proof was {proof.note}"
    if proof.ran and proof.chained < proof.samples:
        return ROUTE_UNPROVEN, (f"the blocks' chained error bound exceeds what a certificate allows on "
                                f"{proof.samples - proof.chained} of {proof.samples} inputs tried")
    return ROUTE_APPLIES, ""


def sentence(model: str, verdict: str, blocker: str, batch: int, fraction: float, best: int, capped: bool, kind,
             target: float, one_reading: float | None = None) -> str:
    """The verdict line ``fedleak check`` prints first (``one_reading``: :attr:`BatchEstimate.one_reading`)."""
    up_to = f"{'at least ' if capped else ''}{best}"
    share = f"{100 * target:.0f}%"
    if kind is not None and kind.only_rounded:
        return (f"the exact route cannot certify: {blocker} (the model alone would allow batches up to {up_to}); its "
                "attack and the first-layer attack still rebuild the samples to within that rounding, uncertified "
                "(auto runs both)")
    if kind is not None and kind.value_clip is not None and replace(kind, value_clip=None).exact_route_possible:
        return (f"the exact route cannot certify: {blocker} (the model alone would allow batches up to {up_to}); the "
                "first-layer attack still certifies a one-sample gradient's input, and of a batch the inputs of rows "
                "no entry at the bound touches, uncertified (auto holds them and searches, clipping alike, for the "
                "rest)")
    if kind is not None and not kind.exact_route_possible:
        return (f"the exact route cannot apply: {blocker} (the model alone would allow batches up to {up_to}); run the "
                "optimisation attacks below")
    if verdict == ROUTE_APPLIES:
        return (f"the exact route applies to {model} up to batch {up_to} (at least {share} of the samples "
                f"certifiable); "
                f"at batch {batch}: about {100 * fraction:.0f}%{peeling_clause(one_reading)}")
    if verdict == ROUTE_UNPROVEN:
        return (f"the exact route may apply to {model} up to batch {up_to}, unproven: {blocker}")
    if verdict == ROUTE_PARTIAL:
        full = f"up to batch {up_to}" if best > 0 else "at no batch size"
        return (f"the exact route certifies only part of a batch of {batch} on {model}: {blocker}; it applies in full "
                f"(at least {share} of the samples) {full}")
    if best > 0:
        return f"the exact route cannot apply to {model} at batch {batch}: {blocker}; it applies up to batch {up_to}"
    return f"the exact route cannot apply to {model}: {blocker}"


def fished(target: int) -> str:
    """The clause a class-fished model's verdict starts with (``target``: the class its output layer fishes)."""
    return (f"the model's output layer is class-fished (class {target}): run class-fishing, which certifies that "
            "class's samples by counting them on the first layer; besides it, ")


def unreadable(model: str, shape: tuple[int, ...], parameters: int, blocker: str, kind, sizes: tuple[int, ...],
               target: float, notes: tuple[str, ...] = (), first_layer_changed: str = "") -> Plan:
    """The plan of a model the exact route cannot read or finds nothing in (``blocker``: why, a clause;
    ``first_layer_changed``: why the first-layer attack would not certify what its first Linear layer reads)."""
    from fedleak import available_attacks

    batch = sizes[-1]
    facts = RouteFacts(ROUTE_CANNOT, batch, 0.0, 0, blocker, False, False, kind, first_layer_changed)
    return Plan(
        model=model, input_shape=tuple(shape), parameters=parameters,
        verdict=f"the exact route cannot apply to {model}: {blocker}", route=ROUTE_CANNOT, target=target,
        batch_size=batch, max_batch_size=0, capped=False,
        evidence=Evidence(False, 0, "nothing measured: the exact route does not read this model"), update=kind,
        blocks=(), dense=(), estimates=(), proposal=None, attacks=advise(facts, available_attacks()), notes=notes,
    )
