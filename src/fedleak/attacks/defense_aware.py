"""Defense-aware attacks: a known defense is a known function, so it goes into the attacker's forward model.

The insight of ROG (Yue et al., "Gradient Obfuscation Gives a False Sense of Security in Federated Learning",
USENIX Security 2023): sparsification, quantisation, sign compression and clipping are deterministic functions
the server knows, so an attacker can simulate them. Two uses:

* **Optimisation attacks** (DLG, iDLG, IG, DLM, DLM+; option ``defense``): the simulated update goes through
  the stack's forward model :meth:`~fedleak.defenses.stack.DefenseStack.observe` before it is matched, so a
  top-k client's dropped entries are masked out instead of matched as zeros
  (:class:`~fedleak.attacks.defense_forward.ForwardModel`).
* **The exact attack** (``exclusivity``; option ``defense``): its certificate rests on exact gradient-row
  ratios. :data:`EXACT_RULES` is the one table of what it can do under each defense, keyed by the defense's
  name: certify with the defense in the certificate, or say why it cannot (noise, rounding, dropped entries,
  changed data); a defense without a rule is refused with a reason that names it (:func:`exact_rule`). A
  refused defense never yields a certificate (:meth:`ExactPlan.finish`). Certified through:

  - ``dp-sgd`` without noise: per-sample clipping with a known bound (the option ``clip_norm``);
  - ``clipping`` of the whole update (and ``central-dp``, noise-free ``gaussian-noise``/``laplace-noise`` with
    ``clip``): one unknown common factor, fitted by the certificate (``known_scale=False``);
  - ``clipping`` per layer (MLPs): each layer's unknown factor follows from the ReLU homogeneity of the gradient
    (:func:`layer_scales`) and is undone before the attack;
  - ``label-smoothing``: the inputs are unchanged, the certificate recomputes the smoothed loss
    (``label_smoothing``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from fedleak.defenses.base import Defense, Stage
from fedleak.defenses.stack import DefenseStack
from fedleak.errors import OptionError
from fedleak.reconstruction import Reconstruction
from fedleak.registry import Registry
from fedleak.validation import describe

Tensors = Mapping[str, torch.Tensor]
Scalable = TypeVar("Scalable")  # a tensor, or what scales like one (an update's rounding noise)

#: a clipped group's observed norm lies this close (relative) to the bound: float32 rounding of the scaling
CLIPPED_TOL = 1e-4


def defense_stack(spec: Any) -> DefenseStack:
    """The ``defense`` option as a :class:`DefenseStack`: a stack, a defense, a spec ``"name:key=value,..."``,
    a list of them, or None / ``"none"`` (no defense). Anything else is an :class:`OptionError`."""
    if isinstance(spec, (Mapping, bytes)) or not (spec is None or isinstance(spec, (DefenseStack, Defense, str))
                                                   or isinstance(spec, Iterable)):
        raise OptionError(f"option defense must be a DefenseStack, a Defense, a spec 'name:key=value,...' or a "
                          f"list of them, got {describe(spec)}")
    try:
        return DefenseStack.of(spec)
    except OptionError as exc:
        raise OptionError(f"option defense: {exc}") from None


# ---------------------------------------------------------------------------------------------------------
# The exact attack: what it can certify under each defense



@dataclass(frozen=True)
class ExactPlan:
    """What the exact attack does under a defense: option ``overrides`` and per-tensor ``factors`` (the observed
    update is multiplied by them first) that put the defense into the certificate, a ``note`` saying so, or a
    ``refusal``: why no certificate is possible (then nothing is certified; the rebuilt candidates are returned
    with that reason)."""

    overrides: Mapping[str, object] = field(default_factory=dict)
    factors: Mapping[str, float] = field(default_factory=dict)
    note: str = ""
    refusal: str = ""

    def apply(self, options: Any) -> Any:
        """``options`` (an options dataclass) with the overrides applied."""
        return dataclasses.replace(options, **dict(self.overrides)) if self.overrides else options

    def rescale(self, tensors: Mapping[str, Scalable] | None) -> dict[str, Scalable] | None:
        """``tensors`` (the observed update, or its rounding noise) times the plan's factors."""
        if tensors is None:
            return None
        return {k: t * self.factors[k] if k in self.factors else t for k, t in tensors.items()}

    def finish(self, rec: Reconstruction) -> Reconstruction:
        """The attack's result under this plan: with a refusal every certificate is withdrawn and every sample's
        reason names the defense; the note is added either way."""
        notes = rec.notes + tuple(n for n in (self.note, self.refusal) if n)
        if not self.refusal:
            return dataclasses.replace(rec, notes=notes)
        samples = tuple(dataclasses.replace(s, certified=False, reason=(
            f"{self.refusal} (the update as sent would certify it: {s.reason})" if s.certified else
            f"{self.refusal} ({s.reason})" if s.reason else self.refusal)) for s in rec.samples)
        missing = f"{self.refusal}; {rec.missing_reason}" if rec.missing_reason else (
            self.refusal if len(rec) == 0 or (rec.batch_size is not None and len(rec) < rec.batch_size) else "")
        return dataclasses.replace(rec, certified=torch.zeros(len(rec), dtype=torch.bool), samples=samples,
                                   batch_certified=False, joint_residual=float("nan"), notes=notes,
                                   missing_reason=missing)


@dataclass(frozen=True)
class ExactContext:
    """What a rule may read: the ``observed`` update (name -> tensor) and the network the attack reads it with
    (:class:`fedleak.nets.Network`: conv ``blocks``, then the dense ReLU ``head``)."""

    observed: Tensors
    net: Any


ExactRule = Callable[[Defense, ExactContext], ExactPlan]

#: the exact attack's rule per defense name: ``rule(defense, context) -> ExactPlan``
EXACT_RULES: Registry[ExactRule] = Registry("exact-attack defense rule")


def refused(defense: Defense, why: str) -> ExactPlan:
    return ExactPlan(refusal=f"the update went through {defense.label}: {why}, so no certificate is possible")


def refusal(why: str) -> ExactRule:
    """A rule that refuses every setting of its defense, saying ``why``."""
    return lambda defense, context: refused(defense, why)


#: why a defense without a rule is refused, by stage
UNMODELLED = {
    Stage.BATCH: "it changed the batch before the gradient, so a certificate would be about the changed samples, "
                 "not the client's data",
    Stage.STEP: "it computed the gradient in a way the certificate does not model",
    Stage.UPDATE: "it changed the update in a way the certificate does not model",
}

NOISED = "every entry carries {} noise, so no row is an exact multiple of a sample's input"

for _name, _why in {
    "local-dp": NOISED.format("Gaussian"),
    "quantize": "its rows are rounded to a grid of levels, so their ratios are no longer a sample's input",
    "qsgd": "its rows are stochastically rounded to a few levels per tensor, so their ratios are no longer a "
            "sample's input",
    "sign": "only signs are sent, so no row carries a sample's values",
    "half-precision": "every entry is rounded to half precision, so a row gives its sample's input only to that "
                      "rounding (rebuilt, uncertified)",
    "top-k": "most entries are dropped, so the rows no longer carry whole inputs and zero rows prove nothing",
    "gradient-pruning": "its smallest entries are dropped, so the rows no longer carry whole inputs and zero rows "
                        "prove nothing",
    "soteria": "it prunes the representation layer's gradient, so the rows no longer carry whole inputs",
}.items():
    EXACT_RULES.register(_name, refusal(_why))


# --- clipping: factors the attacker can undo ------------------------------------------------------------


def clipped_groups(observed: Tensors, bound: float, group_of: Callable[[str], str], p: float = 2.0) -> list[str]:
    """The groups of ``observed`` whose Lp norm reaches ``bound`` (within :data:`CLIPPED_TOL`): those a clipping
    defense scaled by an unknown factor. A group below the bound was sent unchanged."""
    members: dict[str, list[torch.Tensor]] = {}
    for name, t in observed.items():
        if t.is_floating_point():
            members.setdefault(group_of(name), []).append(t.detach().double().flatten().cpu())
    return [g for g, ts in members.items()
            if float(torch.linalg.vector_norm(torch.cat(ts), ord=p)) >= bound * (1 - CLIPPED_TOL)]


def layer_scales(context: ExactContext) -> list[float] | str:
    """Per dense layer ``l`` of an MLP, the factor ``c_l`` its part of the observed update carries relative to the
    output layer's (``c_L = 1``), or why it cannot be told.

    ReLU networks are positively homogeneous (Euler's theorem), so the true mean-loss gradient obeys, for every
    batch, ``<G_{l+1}, W_{l+1}> = <G_l, W_l> + <g_l, b_l>`` (both are ``Σ_k δ_{l,k} · a_{l,k}``). A part scaled by
    an unknown ``c_l`` breaks the equality by ``c_{l+1} / c_l``, which the observed update and the weights reveal.
    """
    net = context.net
    if net is None or net.blocks:
        return "the layer factors are recovered for MLPs only"
    dense = net.head.dense
    W, b = net.head.weights(torch.float64), net.head.biases(torch.float64)
    obs = context.observed
    into, out = [], []
    for i, d in enumerate(dense):
        g = obs[d.weight_name].detach().double().to(W[i].device)
        into.append(float((g * W[i]).sum()))
        if d.bias_name is not None and b[i] is not None:
            gb = obs[d.bias_name].detach().double().to(W[i].device)
            out.append((float((g * W[i]).sum() + (gb * b[i]).sum()),
                        float((g * W[i]).abs().sum() + (gb * b[i]).abs().sum())))
        else:
            out.append((into[-1], float((g * W[i]).abs().sum())))
    scales = [1.0]
    for i in range(len(dense) - 2, -1, -1):
        total, size = out[i]
        if not abs(total) > HOMOGENEITY_MARGIN * size or not into[i + 1] * total > 0:
            return (f"the layer factors cannot be told apart (layer '{dense[i].name}': its gradient's inner product "
                    "with the weights cancels)")
        scales.insert(0, scales[0] * total / into[i + 1])  # c_i / c_L = (c_i / c_{i+1}) (c_{i+1} / c_L)
    return scales


#: the homogeneity identity's sums must not cancel below this fraction of their terms' magnitudes. Measured on
#: float32 gradients of an MLP on Fashion-MNIST (batches of 1-16) the identity held to 1e-8..1.4e-6 relative at
#: margins down to 1e-4; a ratio off by more than the float32 noise fails the certificate's witness fit, which
#: checks each sample's rows of adjacent layers against one scale, so a worse ratio costs certificates, not soundness
HOMOGENEITY_MARGIN = 1e-5


def clipping_plan(defense: Defense, context: ExactContext, bound: float, group_of: Callable[[str], str],
                  p: float = 2.0) -> ExactPlan:
    """The plan for clipping of groups ``group_of`` to Lp norm ``bound``: the plain attack when no group reached
    the bound; one unknown common factor (fitted by the certificate, as a weight delta's learning rate) for one
    group; per-layer factors recovered by :func:`layer_scales` (MLPs, one group per dense layer) and undone,
    relative to a layer sent unclipped where there is one; else refused."""
    observed = context.observed
    clipped = clipped_groups(observed, bound, group_of, p)
    groups = {group_of(n) for n, t in observed.items() if t.is_floating_point()}
    if not clipped:
        return ExactPlan(note=f"{defense.label}: no part of the update reaches the bound, so it was sent unchanged")
    unknown = ExactPlan(overrides={"known_scale": False},
                        note=f"{defense.label}: the whole update was scaled by one unknown factor; the certificate "
                             "fits it (known_scale=False, the batch size from num_examples)")
    if len(groups) == 1:
        return unknown
    layers = [d for d in context.net.head.dense] if context.net is not None else []
    per_layer = [{group_of(n) for n in d.parameter_names()} for d in layers]
    if not (all(len(g) == 1 for g in per_layer) and sorted(g for s in per_layer for g in s) == sorted(groups)):
        return refused(defense, f"{len(clipped)} of its {len(groups)} parts ({', '.join(map(repr, clipped[:3]))}"
                                f"{', ...' if len(clipped) > 3 else ''}) were scaled by unknown factors that do not "
                                "follow the dense layers, while the certificate needs one scale across the layers")
    scales = layer_scales(context)
    if isinstance(scales, str):
        return refused(defense, f"its parts were scaled by different unknown factors and {scales}")
    names = [next(iter(g)) for g in per_layer]
    ref = next((i for i in range(len(layers) - 1, -1, -1) if names[i] not in clipped), None)
    base = scales[ref] if ref is not None else scales[-1]
    factors = {n: base / scales[i] for i, d in enumerate(layers) for n in d.parameter_names()}
    note = (f"{defense.label}: {len(clipped)} layer(s) were scaled by unknown factors; recovered from the ReLU "
            "homogeneity of the gradient (<G_l+1, W_l+1> = <G_l, W_l> + <g_l, b_l>) and undone "
            f"(factors {', '.join(f'{f:.4g}' for f in dict.fromkeys(factors.values()))})")
    if ref is not None:
        return ExactPlan(factors=factors, note=note + f", relative to layer '{layers[ref].name}', sent unclipped")
    return ExactPlan(overrides=unknown.overrides, factors=factors, note=note + "; every layer was clipped, so one "
                     "common unknown factor remains (known_scale=False)")


@EXACT_RULES.decorator("clipping")
def clipping_rule(defense: Defense, context: ExactContext) -> ExactPlan:
    from fedleak.defenses.clipping import GROUPINGS

    per, bound = getattr(defense, "per"), float(getattr(defense, "bound"))
    if per == "tensor" and clipped_groups(context.observed, bound, GROUPINGS[per]):
        return refused(defense, "weights and biases were scaled by different unknown factors, so the ratio of a "
                                "weight row to its bias entry (a sample's input) is off by their quotient")
    return clipping_plan(defense, context, bound, GROUPINGS[per])


#: why a value-clipped update certifies nothing
VALUE_CLIPPED = ("the entries beyond the bound were cut to it, so the rows holding them no longer carry whole inputs "
                 "and the update is not the gradient the certificate recomputes")


@EXACT_RULES.decorator("value-clipping")
def value_clipping_rule(defense: Defense, context: ExactContext) -> ExactPlan:
    """Clipping by value: the plain attack when no entry reached the bound (the update was sent unchanged), else
    refused (the rows of a one-sample gradient's first layer still give its input: ``first-layer``)."""
    bound = float(getattr(defense, "bound"))
    reached = sum(int((t.detach().abs() >= bound * (1 - CLIPPED_TOL)).sum())
                  for t in context.observed.values() if t.is_floating_point())
    if not reached:
        return ExactPlan(note=f"{defense.label}: no entry of the update reaches the bound, so it was sent unchanged")
    return refused(defense, f"{VALUE_CLIPPED} ({reached} entries at it)")


def noise_rule(p: float, scale_field: str, kind: str) -> ExactRule:
    """A noise filter's rule: refused with noise; without it (scale 0) only its whole-update clipping remains."""
    def rule(defense: Defense, context: ExactContext) -> ExactPlan:
        if getattr(defense, scale_field) > 0:
            return refused(defense, NOISED.format(kind))
        bound = getattr(defense, "clip")
        if bound is None:
            return ExactPlan(note=f"{defense.label}: no noise and no clipping, so the update was sent unchanged")
        return clipping_plan(defense, context, float(bound), lambda n: "", p)
    return rule


EXACT_RULES.register("gaussian-noise", noise_rule(2.0, "sigma", "Gaussian"))
EXACT_RULES.register("laplace-noise", noise_rule(1.0, "scale", "Laplace"))


@EXACT_RULES.decorator("central-dp")
def central_dp_rule(defense: Defense, context: ExactContext) -> ExactPlan:
    """Flower's central DP: the server sees each client's update clipped as a whole; the noise goes on the
    aggregate only."""
    return clipping_plan(defense, context, float(getattr(defense, "clip")), lambda n: "")


@EXACT_RULES.decorator("dp-sgd")
def dp_sgd_rule(defense: Defense, context: ExactContext) -> ExactPlan:
    """DP-SGD without noise is per-sample clipping with a known bound: the certificate recomputes each sample's
    factor ``min(1, C/||g_k||)`` (option ``clip_norm``); with noise no certificate is possible."""
    z, bound = float(getattr(defense, "noise_multiplier")), float(getattr(defense, "max_grad_norm"))
    if z > 0:
        return refused(defense, f"its gradient carries Gaussian noise of std {z:g} x {bound:g} on every entry, so no "
                                "row is an exact multiple of a sample's input")
    if context.net is not None and context.net.blocks:
        return refused(defense, "each sample's gradient was clipped by a factor that depends on its conv layers' "
                                "gradient too, which the certificate does not recompute")
    return ExactPlan(overrides={"clip_norm": bound},
                     note=f"{defense.label}: no noise; each sample's gradient was clipped to norm {bound:g}, which the "
                          "certificate recomputes from the rebuilt sample (clip_norm)")


@EXACT_RULES.decorator("label-smoothing")
def label_smoothing_rule(defense: Defense, context: ExactContext) -> ExactPlan:
    """Label smoothing leaves the inputs as they are and changes every loss vector: the certificate recomputes the
    smoothed loss (option ``label_smoothing``)."""
    smoothing = float(getattr(defense, "smoothing"))
    return ExactPlan(overrides={"label_smoothing": smoothing},
                     note=f"{defense.label}: the client's loss is a cross-entropy with label smoothing {smoothing:g}, "
                          "which the certificate recomputes (label_smoothing)")


@EXACT_RULES.decorator("augmentation")
def augmentation_rule(defense: Defense, context: ExactContext) -> ExactPlan:
    """Augmentation moves each image's content (a flip, a shift): the certificates are about the moved images."""
    return ExactPlan(note=f"{defense.label}: the client trained on its images flipped and shifted at random; a "
                          "certificate is about such a moved image, which shows what the original shows")


def exact_rule(defense: Defense) -> ExactRule:
    """The rule for ``defense``: its registered one, else a refusal that names it (by its stage)."""
    if defense.name in EXACT_RULES:
        return EXACT_RULES.get(defense.name)
    return refusal(UNMODELLED[defense.stage])


def exact_plan(stack: DefenseStack, observed: Tensors, net: Any = None) -> ExactPlan:
    """What the exact attack does under every defense of ``stack`` together (``net``: the network it reads the
    model as). One defense: its rule's plan. Several: only a stack of at most one that changes anything (and
    refusals win), since each rule reads the update as that defense alone left it."""
    plans = [(d, exact_rule(d)(d, ExactContext(observed, net))) for d in stack.defenses]
    for _, plan in plans:
        if plan.refusal:
            return plan
    acting = [(d, p) for d, p in plans if p.overrides or p.factors]
    if len(acting) > 1:
        return refused(acting[1][0], f"the certificate models one rescaling defense at a time, and "
                                     f"{acting[0][0].label} already rescales the update")
    notes = "; ".join(p.note for _, p in plans if p.note)
    if not acting:
        return ExactPlan(note=notes)
    return dataclasses.replace(acting[0][1], note=notes)


__all__ = [
    "CLIPPED_TOL", "EXACT_RULES", "ExactContext", "ExactPlan", "clipped_groups", "clipping_plan", "defense_stack",
    "exact_plan", "exact_rule", "layer_scales", "refusal", "refused",
]
