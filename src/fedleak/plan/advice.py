"""Which attacks are worth running, each with a one-line why: one advisor per attack name, in a registry.

An advisor reads :class:`RouteFacts` (what the plan found about the exact route, and the update's kind) and the
attack's registered :class:`~fedleak.attacks.AttackInfo`; an attack without an advisor (a plug-in) gets its own
description and whether it runs on this kind of update.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from fedleak.plan.result import ROUTE_APPLIES, ROUTE_CANNOT, ROUTE_UNPROVEN, AttackAdvice, peeling_clause
from fedleak.registry import Registry

if TYPE_CHECKING:
    from fedleak.attacks import AttackInfo
    from fedleak.update_kind import UpdateKind


@dataclass(frozen=True)
class RouteFacts:
    """What advisors read: the exact route's verdict at ``batch_size`` (``fraction`` of samples meeting its
    condition there; ``max_batch_size`` where at least the target does), ``blocker`` (why it does not apply, one
    clause; empty when it does), the network (``is_conv``, ``max_pooled``), the update's kind (None: no update) and
    why the first-layer attack would not certify what the first Linear layer reads (``first_layer_changed``)."""

    route: str
    batch_size: int
    fraction: float
    max_batch_size: int
    blocker: str
    is_conv: bool
    max_pooled: bool
    update: UpdateKind | None
    first_layer_changed: str = ""  # why the first Linear layer may not read the sample as it is (empty: it does)
    fished_class: int | None = None  # the class a class-fished output layer targets (None: the model is not one)
    one_reading: float | None = None  # where the attack peels, the share its first reading certifies at batch_size

    @property
    def update_kind(self) -> str | None:
        """``"gradient"`` or ``"weights"``, as attacks declare what they run on (None without an update)."""
        if self.update is None:
            return None
        return "gradient" if self.update.is_gradient else "weights"

    @property
    def exact_possible(self) -> bool:
        return self.update is None or self.update.exact_route_possible

    @property
    def exact_useful(self) -> bool:
        return self.exact_possible and self.route != ROUTE_CANNOT and self.fraction > 0


Advisor = Callable[[RouteFacts, "AttackInfo"], AttackAdvice]
ADVISORS: Registry[Advisor] = Registry("attack advisor")


def advise(facts: RouteFacts, attacks: dict[str, AttackInfo]) -> tuple[AttackAdvice, ...]:
    """Advice on every attack in ``attacks`` (name -> info), recommended ones first."""
    out = []
    for name, info in attacks.items():
        if facts.update_kind is not None and facts.update_kind not in info.update_kinds:
            out.append(AttackAdvice(name, False, False, f"runs on {' and '.join(info.update_kinds)} updates, and this "
                                                        f"update is a {facts.update_kind} update"))
            continue
        advisor = ADVISORS.get(name) if name in ADVISORS else _generic
        out.append(advisor(facts, info))
    return tuple(sorted(out, key=lambda a: not a.recommended))


def on_range(advice: tuple[AttackAdvice, ...], attacks: dict[str, AttackInfo],
             value_range: tuple[float, float] | None) -> tuple[AttackAdvice, ...]:
    """``advice`` for inputs on ``value_range``: where it leaves [0, 1], the default box of the searches, each
    recommended search that reads the data's range is told to take it (None: no inputs were given)."""
    if value_range is None or (value_range[0] >= 0.0 and value_range[1] <= 1.0):
        return advice
    lo, hi = value_range
    told = (f"; the inputs lie in [{lo:.4g}, {hi:.4g}], off its default box [0, 1]: give it "
            f"data_range=({lo:.4g}, {hi:.4g})")
    return tuple(replace(a, why=a.why + told) if a.recommended and attacks[a.name].optimises
                 and attacks[a.name].reads_range else a for a in advice)


def _generic(facts: RouteFacts, info: AttackInfo) -> AttackAdvice:
    return AttackAdvice(info.name, False, info.needs_relu_network, f"no advice rule for this attack; it is: "
                                                                   f"{info.description}")


def _update_blocks(facts: RouteFacts) -> str:
    u = facts.update
    return f"the update is a {u.summary()}, on which the exact route's certificates fail" if u is not None else ""


def _rounded(facts: RouteFacts) -> bool:
    """Whether all that keeps the exact route from certifying is the update's coarse format (float16, bfloat16)."""
    return facts.update is not None and facts.update.only_rounded


@ADVISORS.decorator("exclusivity")
def _exclusivity(facts: RouteFacts, info: AttackInfo) -> AttackAdvice:
    if _rounded(facts) and not facts.is_conv:
        return AttackAdvice(info.name, False, True, f"{_update_blocks(facts)}; it still rebuilds the samples whose "
                                                    "rows its condition gives, to that rounding (auto holds the first "
                                                    "Linear layer's rows)")
    if not facts.exact_possible:
        return AttackAdvice(info.name, False, True, _update_blocks(facts))
    pct = f"{100 * facts.fraction:.0f}%"
    summed = ("; the loss is summed over the batch: pass loss_reduction='sum' (and the number of examples)"
              if facts.update is not None and facts.update.summed else
              "; the gradient is scaled up (read as a gradient times a common factor)"
              if facts.update is not None and facts.update.scaled_up else "")
    if facts.route == ROUTE_APPLIES:
        why = (f"certified and exact: the route applies up to batch {facts.max_batch_size} (about {pct} of the samples "
               f"of a batch of {facts.batch_size}{peeling_clause(facts.one_reading)})")
        return AttackAdvice(info.name, True, True, why + summed)
    if facts.route == ROUTE_UNPROVEN:
        return AttackAdvice(info.name, facts.fraction > 0, True,
                            f"certifies a sample only where the attack proves its conv blocks: {facts.blocker}")
    if facts.exact_useful:
        return AttackAdvice(info.name, True, True, f"certifies about {pct} of a batch of {facts.batch_size} (the route "
                                                   f"applies in full up to batch {facts.max_batch_size}){summed}")
    return AttackAdvice(info.name, False, True, f"cannot apply: {facts.blocker}")


@ADVISORS.decorator("conv-exclusivity")
def _conv_exclusivity(facts: RouteFacts, info: AttackInfo) -> AttackAdvice:
    return AttackAdvice(info.name, False, True, "the same attack as exclusivity (its former name for CNNs)")


@ADVISORS.decorator("auto")
def _auto(facts: RouteFacts, info: AttackInfo) -> AttackAdvice:
    fallback = "DLM+" if facts.update_kind == "weights" else "IG"
    if facts.route == ROUTE_APPLIES and facts.exact_possible:
        return AttackAdvice(info.name, False, False, "would run the exact route, which applies here; run "
                                                     "exclusivity directly")
    if _rounded(facts) and not facts.is_conv:
        return AttackAdvice(info.name, True, False, f"its exact step cannot certify this update (values rounded to "
                                                    f"{facts.update.precision}); it holds the inputs the first Linear "
                                                    "layer's rows give to that rounding (uncertified) and searches "
                                                    f"with {fallback} for the rest")
    if not facts.exact_possible and facts.update.value_clip is not None:
        return AttackAdvice(info.name, True, False, f"its exact step cannot certify this update (clipped by value); "
                                                    "it reads the first Linear layer (a one-sample gradient certified, "
                                                    f"a batch's rows uncertified) and searches with {fallback} for the "
                                                    "rest, clipping its simulated gradients alike")
    if not facts.exact_possible:
        u, rows = facts.update, ""
        if facts.update_kind == "weights" and u.multi_step and not facts.is_conv:
            rows = "holds the inputs its first Linear layer's rows give (uncertified) and "
        elif u is not None and u.noised and not (u.sparsified or u.quantised or facts.is_conv):
            rows = ("holds the inputs its first Linear layer's rows agree on (uncertified: a gradient of another "
                    "loss, multi-label BCE or MSE over three outputs or more, gives them; a noised one, none) and ")
        why = f"its exact step cannot certify this update, so it {rows}comes down to {fallback} (uncertified)"
        return AttackAdvice(info.name, True, False, why)
    steps_unknown = facts.update_kind == "weights" and facts.update.kind != "one-step" and not facts.is_conv
    rows = ("; where it certifies nothing of this weight change (several local steps?), it holds the inputs its "
            "first Linear layer's rows give (uncertified)" if steps_unknown else "")
    return AttackAdvice(info.name, True, False, f"runs the exact route where it certifies samples{rows}, then "
                                                f"{fallback} (uncertified) for the rest")


@ADVISORS.decorator("dlm+")
def _dlm_plus(facts: RouteFacts, info: AttackInfo) -> AttackAdvice:
    u = facts.update
    if u is None:
        return AttackAdvice(info.name, False, False, "for FedAvg weight updates (plan with an update to tell)")
    steps = "are unknown" if u.local_steps is None else f"are {u.local_steps}"
    recommended = u.local_steps is None or u.multi_step
    return AttackAdvice(info.name, recommended, False,
                        f"matches the weight change without its learning rate or step count (local steps {steps}); "
                        "uncertified")


@ADVISORS.decorator("dlm")
def _dlm(facts: RouteFacts, info: AttackInfo) -> AttackAdvice:
    u = facts.update
    if u is None or u.local_steps is None:
        return AttackAdvice(info.name, False, False, "unrolls a declared number of local steps; this update declares "
                                                     "none (dlm+ needs none)")
    return AttackAdvice(info.name, u.multi_step, False,
                        f"unrolls the {u.local_steps} declared local step(s) with a learned learning rate; uncertified")


@ADVISORS.decorator("ig")
def _ig(facts: RouteFacts, info: AttackInfo) -> AttackAdvice:
    if facts.exact_useful and facts.route == ROUTE_APPLIES:
        return AttackAdvice(info.name, False, False, "the exact route already certifies the batch; IG adds only "
                                                     "uncertified guesses")
    if facts.update_kind == "weights" and not (facts.update is not None and facts.update.kind == "one-step"):
        return AttackAdvice(info.name, False, False, "matches gradients; for a weight update of several or unknown "
                                                     "steps dlm+ fits better")
    what = "a max-pooled CNN" if facts.max_pooled else ("a CNN" if facts.is_conv else "this model")
    return AttackAdvice(info.name, True, False, f"the usual optimisation attack for {what} (cosine matching with an "
                                                "image prior); uncertified: its images are guesses to inspect")


@ADVISORS.decorator("idlg")
def _idlg(facts: RouteFacts, info: AttackInfo) -> AttackAdvice:
    single = facts.batch_size == 1
    useful = single and not (facts.exact_useful and facts.route == ROUTE_APPLIES)
    why = ("at batch 1 it reads the label exactly from the output layer, then matches the gradient; uncertified"
           if single else f"reads labels exactly only at batch 1 (this batch is {facts.batch_size}); uncertified")
    return AttackAdvice(info.name, useful and facts.update_kind != "weights", False, why)


@ADVISORS.decorator("dlg")
def _dlg(facts: RouteFacts, info: AttackInfo) -> AttackAdvice:
    return AttackAdvice(info.name, False, False, "the original L2 matching baseline; idlg and ig supersede it "
                                                 "(uncertified)")


@ADVISORS.decorator("first-layer")
def _first_layer(facts: RouteFacts, info: AttackInfo) -> AttackAdvice:
    if facts.is_conv:
        return AttackAdvice(info.name, False, True, "needs the input to enter a Linear layer; here it enters a conv")
    if facts.update_kind == "weights":
        several = facts.update is not None and facts.update.kind != "one-step"
        return AttackAdvice(info.name, several, False, "reads a weight change of any number of local steps off its "
                                                       "first Linear layer's rows (where a ReLU follows): the inputs "
                                                       "of units that fire for one sample only, exactly, uncertified "
                                                       "(nothing on two classes unless the steps are declared as one)")
    if facts.batch_size != 1:
        return AttackAdvice(info.name, False, True, f"certifies one sample's gradient only (this batch is "
                                                    f"{facts.batch_size}); of a batch it rebuilds, uncertified, the "
                                                    "samples of first-layer units that fire for one sample only "
                                                    "(where a ReLU follows), as auto does where the exact route "
                                                    "cannot read the model")
    useful = not (facts.exact_useful and facts.route == ROUTE_APPLIES)
    if facts.first_layer_changed:
        return AttackAdvice(info.name, useful, False, "at batch 1 it rebuilds what the first Linear layer reads, "
                                                      f"uncertified: {facts.first_layer_changed}")
    return AttackAdvice(info.name, useful, True, "at batch 1 the first Linear layer that reads the input (with a "
                                                 "bias) holds it exactly, whatever follows; certified where the "
                                                 "model's gradient at it reproduces the whole update")


def _malicious(facts: RouteFacts, info: AttackInfo) -> AttackAdvice:
    return AttackAdvice(info.name, False, True, "a malicious server's attack: it needs a first layer the server "
                                                "crafted, so it tells nothing about an honest server's view of this "
                                                "update")


def _class_fishing(facts: RouteFacts, info: AttackInfo) -> AttackAdvice:
    if facts.fished_class is not None:
        return AttackAdvice(info.name, True, True, f"the model's output layer is class-fished (class "
                                                   f"{facts.fished_class}): the samples of that class alone on a "
                                                   "first-layer unit are certified by counting, then others as those "
                                                   "are peeled off (with the batch size the client reported; a weight "
                                                   "update with the rate and the one step the server set)")
    return AttackAdvice(info.name, False, True, "a malicious server's attack: it needs an output layer the server "
                                                "crafted (fedleak.class_fishing_weights), whose target class's samples "
                                                "it then counts off the first layer; it tells nothing about an honest "
                                                "server's view of this update")


ADVISORS.register("imprint", _malicious)
ADVISORS.register("trap-weights", _malicious)
ADVISORS.register("class-fishing", _class_fishing)
