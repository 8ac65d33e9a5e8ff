"""What kind of client update this is, from what the client declares and what the numbers show.

A FedSGD gradient, a FedAvg weight change from one local step (the exact route applies: the learning rate
cancels in every ratio ``ΔW_i / Δb_i``), or one from several local steps (it does not: the change mixes
gradients taken at different weights). Declared facts come from :class:`~fedleak.updates.WeightUpdate`
(``local_steps``, ``num_examples``, ``metadata``) or the ``declared`` mapping; the keys are
:data:`fedleak.declared.DECLARED_KEYS`. Where the numbers show more, it says so:

* **noise** — with cross-entropy, the output layer's bias gradient of every sample is ``p - onehot(y)``,
  whose entries sum to 0. So does a sum of such steps (SGD, momentum). An update whose output-bias change
  does not sum to 0 (beyond float rounding) was noised, or trained with weight decay, Adam or another loss.
* **sparsification** — the output layer's change is dense (``p_c > 0`` for every class): exact zeros there,
  outside the columns of silent penultimate units, mean entries were dropped.
* **quantisation** — a large tensor holding only a few hundred distinct values (among up to 65,536 of its
  entries), and so does the next largest that can tell: a quantiser rounds every tensor, while one tensor's values
  may be few by their nature (inputs of a few bits times one factor per unit: a class-fished model's first layer).
* **weight decay** (weight changes, with the model) — SGD's decay moves every weight by a common factor times
  itself; the units no sample activated show it alone (:mod:`fedleak.attacks.exact.decay`). It is reported, and the
  signatures above are read on the change without it.
* **precision** (gradients) — values that carry a format coarser than float32 (:mod:`fedleak.precision`: sent in
  float16 or bfloat16, or computed under mixed precision): rounded beyond what a certificate's witness rows may be;
  the noise signature then allows for that rounding of the output-layer bias. (A weight change's rounding is read
  off the weights sent: :attr:`UpdateKind.rounding`.)
* **summed loss** (gradients) — a sample's ``p - onehot(y)`` has entries adding up to at most 2 in absolute
  value, and so does their mean: an output-bias gradient whose entries add up to more was taken of the batch's
  summed loss (``reduction="sum"``) or scaled up. A summed loss over a batch the model fits well can stay below 2,
  so its absence proves nothing. With the number of examples ``M`` reported, entries adding up to more than ``2 M``
  are more than a summed loss can give: the gradient was scaled up (a loss scaled for mixed precision and sent
  without ``unscale_``, a learning rate), :attr:`UpdateKind.scaled_up`.

* **clipping by value** (gradients) — ``clip_grad_value_`` leaves the update's largest magnitude on the entries of
  several units (:mod:`fedleak.clipped_values`).
* **an adaptive optimizer's step** (weight changes) — Adam, RMSprop, Adagrad or signSGD move a change's entries by
  one size, SGD's spread over many (:mod:`fedleak.adaptive_step`): no scaled gradient, so the exact route does not
  apply (the rounding and decay readings, which assume SGD, are skipped).

Clipping by norm leaves no signature of its own; it is reported when declared (``clip_norm``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from fedleak.declared import declared_facts, local_steps

SPARSE_ZERO_FRACTION = 0.2  # exact zeros among the output layer's live entries
QUANTISED_LEVELS = 256  # at most this many distinct values ...
QUANTISED_MIN_SIZE = 4096  # ... in a tensor at least this large
QUANTISED_SAMPLE = 1 << 16  # entries looked at
QUANTISED_GLANCE = 1024  # ... of which so many, strided, settle most tensors
QUANTISED_CONFIRM = 4 * QUANTISED_LEVELS  # nonzero entries the next tensor needs to confirm it (or refute it)
MEAN_BIAS_L1 = 2.0  # a mean cross-entropy gradient's output-bias entries add up to at most this in absolute value
SUMMED_TOL = 1e-3  # ... beyond float rounding (relative)
SCALED_UP = "scaled up"  # what :func:`_summed` returns for more than a summed loss over the reported examples
ROUNDING_LIMIT = 1e-4  # the exact attack's max_noise: a witness row must be known to this relative precision


@dataclass(frozen=True)
class UpdateKind:
    """What :func:`describe_update` found.

    ``kind``: ``"gradient"`` (FedSGD), ``"one-step"`` or ``"multi-step"`` (FedAvg, local steps declared or
    implied by declared epochs and batch size), or ``"weights"`` (FedAvg, local steps unknown).
    ``noised`` / ``sparsified`` (fraction of zeros) / ``quantised`` (distinct values): detected or declared,
    ``None`` when not; ``noise_declared`` tells declared noise from the detected signature (which weight decay
    or Adam also leave). ``weight_decay``: SGD's weight decay read off a weight change, or an L2 penalty in the loss
    read off a gradient (the signatures are then read without it). ``summed``: a gradient whose output-bias entries
    add up to more than a mean-loss gradient's can (its loss summed over the batch, or scaled up); ``None`` when not
    looked for. ``adaptive``: the one size a weight change's entries move by, where they do (an adaptive optimizer's
    step, :mod:`fedleak.adaptive_step`; the exact route does not apply). ``evidence``: one sentence per finding, with
    its numbers.
    """

    kind: str
    num_examples: int | None = None
    local_steps: int | None = None
    local_batch_size: int | None = None
    noised: bool | None = None
    sparsified: float | None = None
    quantised: int | None = None
    clip_norm: float | None = None
    evidence: tuple[str, ...] = field(default_factory=tuple)
    noise_declared: bool = False
    summed: bool | None = None
    weight_decay: bool = False
    rounding: float | None = None  # a weight change's rows known to this relative precision (float32 rounding)
    precision: str | None = None  # the format coarser than float32 the values carry (float16, bfloat16), if any
    value_clip: float | None = None  # the bound a gradient was clipped to by value (clip_grad_value_), if it shows
    scaled_up: bool = False  # a gradient scaled by more than a summed loss over the reported examples can be
    learning_rate: float | None = None  # a weight change's learning rate, where the server knows it
    adaptive: float | None = None  # the one size a weight change's entries move by: an adaptive optimizer's step

    @property
    def multi_step(self) -> bool:
        return self.kind == "multi-step"

    @property
    def is_gradient(self) -> bool:
        return self.kind == "gradient"

    @property
    def exact_route_possible(self) -> bool:
        """Whether the certified exact route can apply: a gradient or a (possibly) one-step weight change of SGD,
        not noised, sparsified, quantised, rounded to a coarser format or clipped by value."""
        return (not self.multi_step and not self.noised and self.sparsified is None and self.quantised is None
                and self.precision is None and self.value_clip is None and self.adaptive is None)

    @property
    def only_rounded(self) -> bool:
        """Whether all that keeps the exact route from certifying is the values' coarse format (:attr:`precision`):
        it still rebuilds the samples, to within that rounding."""
        return self.precision is not None and replace(self, precision=None).exact_route_possible

    @property
    def too_fine(self) -> bool:
        """A weight change whose median row the float32 rounding of the client's weights leaves coarser than the
        exact attack's ``max_noise`` (1e-4): such rows are no witnesses, and few samples, or none, are certified."""
        return self.rounding is not None and self.rounding > ROUNDING_LIMIT

    def summary(self) -> str:
        """One line, e.g. ``multi-step FedAvg update: 400 examples in 13 local steps of 32 (declared)``."""
        what = {
            "gradient": "FedSGD gradient",
            "one-step": "one-step FedAvg update",
            "multi-step": "multi-step FedAvg update",
            "weights": "FedAvg update (number of local steps not declared)",
        }[self.kind]
        parts = []
        if self.num_examples is not None:
            parts.append(f"{self.num_examples} examples")
        if self.local_steps is not None and self.kind != "gradient":
            step = f"{self.local_steps} local step{'s' if self.local_steps != 1 else ''}"
            parts.append(f"in {step}" + (f" of {self.local_batch_size}" if self.local_batch_size else ""))
        if self.learning_rate is not None:
            parts.append(f"at learning rate {self.learning_rate:g}")
        noise = "noised" if self.noise_declared else "noised or not plain SGD"
        flags = [f for f, on in ((noise, self.noised), ("loss summed over the batch", self.summed),
                                 ("scaled up beyond a summed loss", self.scaled_up),
                                 ("L2 penalty in the loss" if self.kind == "gradient" else "SGD weight decay",
                                  self.weight_decay),
                                 ("clipped", self.clip_norm is not None),
                                 ("most rows finer than the rounding of the client's weights", self.too_fine),
                                 (f"values rounded to {self.precision}", self.precision is not None),
                                 (f"clipped by value at ±{self.value_clip or 0:.4g}", self.value_clip is not None),
                                 ("sparsified", self.sparsified is not None), ("quantised", self.quantised is not None),
                                 ("an adaptive optimizer's step", self.adaptive is not None))
                 if on]
        text = what + (": " + " ".join(parts) if parts else "")
        return text + (f"; {', '.join(flags)}" if flags else "")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "summary": self.summary(), "num_examples": self.num_examples,
                "local_steps": self.local_steps, "local_batch_size": self.local_batch_size, "noised": self.noised,
                "sparsified": self.sparsified, "quantised": self.quantised, "clip_norm": self.clip_norm,
                "noise_declared": self.noise_declared, "summed": self.summed, "weight_decay": self.weight_decay,
                "rounding": self.rounding, "precision": self.precision, "value_clip": self.value_clip,
                "scaled_up": self.scaled_up, "learning_rate": self.learning_rate, "adaptive": self.adaptive,
                "multi_step": self.multi_step, "exact_route_possible": self.exact_route_possible,
                "evidence": list(self.evidence)}


def describe_update(update: Any, model: Any = None, *, declared: Mapping[str, Any] | None = None) -> UpdateKind:
    """What kind of update ``update`` is (see the module docstring).

    ``update``: a :class:`~fedleak.updates.GradientUpdate`, a :class:`~fedleak.updates.WeightUpdate` or a
    mapping of gradients. ``model`` (optional): the model the update is for; it locates the output layer for
    the noise and sparsification signatures. ``declared``: facts the server knows from its run configuration
    (keys :data:`fedleak.declared.DECLARED_KEYS`), e.g. ``{"local_epochs": 1, "batch_size": 32}``.
    """
    from fedleak.adaptive_step import adaptive_step
    from fedleak.clipped_norms import read_layer_clip
    from fedleak.clipped_values import read_value_clip
    from fedleak.precision import update_precision
    from fedleak.updates import WeightUpdate, as_gradient_update

    evidence: list[str] = []
    facts = declared_facts(update, declared)
    if isinstance(update, WeightUpdate):
        tensors = update.delta()
        n, lr = update.num_examples, update.learning_rate or facts.get("learning_rate")
        steps, why = local_steps(update, facts)
        kind = "weights" if steps is None else ("one-step" if steps == 1 else "multi-step")
        if why:
            evidence.append(why + ("; ΔW is then no longer a scaled gradient, so the exact route does not apply"
                                   if kind == "multi-step" else ""))
        else:
            evidence.append("the number of local steps is not declared: the exact route applies only if the client "
                            "took one step (its certificates reject anything else)")
        step = adaptive_step(tensors) if kind != "multi-step" else None
        if step is not None:
            evidence.append(step.describe())
        adaptive = None if step is None else step.size
        rounding = _rounding(update, tensors, evidence) if kind != "multi-step" and step is None else None
        decay = _weight_decay(update, tensors, model) if kind != "multi-step" and step is None else None
    else:
        update = as_gradient_update(update)
        tensors, n, steps, kind, lr = dict(update.gradients), update.num_examples, None, "gradient", None
        rounding, decay, adaptive = None, _weight_decay(update, tensors, model), None
    decayed = decay is not None
    if decay is not None:  # the signatures below are read on the update without it
        tensors = decay
        evidence.append(("an L2 penalty in the client's loss: every weight's gradient holds" if kind == "gradient"
                         else "SGD's weight decay: every weight moved by") + " a common factor times the weight, read "
                        "off the units no sample activated; the exact route peels it off (the signatures below are "
                        "read on the update without it)")
    # a gradient's values; a weight change's rounding is read off the weights sent instead (``rounding``)
    precision = update_precision(tensors if kind == "gradient" else {})
    if precision.coarse:
        evidence.append(f"{precision.describe()}: every value is rounded to {precision.roundoff:.1e} relative, coarser "
                        f"than the {ROUNDING_LIMIT:g} a witness row of a certificate needs: the exact route certifies "
                        "nothing; the inputs it and the first-layer attack rebuild are the samples' to within that "
                        "rounding")
    cut = read_value_clip(tensors) if kind == "gradient" else None
    if cut is not None:
        evidence.append(f"{cut.describe()}: the exact route certifies none of a batch; a one-sample gradient's "
                        "first Linear layer still gives its input, certified, and a batch's first-layer rows the "
                        "inputs no entry at the bound touches, uncertified (auto holds them)")
    if kind == "gradient" and model is not None:
        from fedleak.attacks.labels import negated_columns

        evidence.extend(filter(None, [negated_columns(model, tensors)]))
    layers = read_layer_clip(tensors) if kind == "gradient" and cut is None else None
    if layers is not None:
        evidence.append(f"{layers.describe()}: the exclusivity attack undoes the layers' unknown factors (as for a "
                        "declared clipping per layer), and the searches clip alike")
    noised, sparsified, quantised = _signatures(tensors, model, evidence, precision.roundoff, cut is not None)
    summed = _summed(tensors, model, evidence, n) if kind == "gradient" and noised is False else None
    scaled_up = summed == SCALED_UP
    summed = None if summed is None else summed is True
    noise_declared = facts.get("noise_multiplier", 0) > 0
    if noise_declared:
        noised = True
        evidence.append(f"the client declares DP noise (noise multiplier {facts['noise_multiplier']:g})")
    clip = facts.get("clip_norm")
    if clip is not None:
        evidence.append(f"the client declares clipping at norm {clip:g}")
    return UpdateKind(kind, n, steps, facts.get("batch_size"), noised, sparsified, quantised, clip, tuple(evidence),
                      noise_declared, summed, decayed, rounding,
                      str(precision.dtype).removeprefix("torch.") if precision.coarse else None,
                      None if cut is None else cut.bound, scaled_up, lr, adaptive)


def _rounding(update: Any, delta: Mapping[str, Any], evidence: list[str]) -> float | None:
    """The relative precision of a one-step weight change's rows: per weight matrix, the median over its rows of
    ``||eps/2 |after| + eps |delta| || / ||delta||`` (the client's rounding of its new weights,
    :meth:`fedleak.attacks.exact.noise.RoundingNoise.of_step`); the coarsest matrix's. Said in the evidence where it
    is coarser than :data:`ROUNDING_LIMIT`."""
    import torch

    worst, where = None, ""
    for name, d in delta.items():
        after = update.after[name]
        if d.ndim != 2 or not after.is_floating_point():
            continue
        eps = float(torch.finfo(after.dtype).eps)
        step = max(1, (1 << 20) // max(d.shape[1], 1))  # a block of rows at a time: no copy of a whole layer
        ratios = []
        for s in range(0, d.shape[0], step):
            rows, new = d[s : s + step], after[s : s + step]
            size = rows.norm(dim=1)
            moved = size > 0
            ratios.append((new.abs() * (eps / 2) + rows.abs() * eps).norm(dim=1)[moved] / size[moved])
        ratios = torch.cat(ratios)
        if not len(ratios):
            continue
        median = float(ratios.median())
        if worst is None or median > worst:
            worst, where = median, name
    if worst is not None and worst > ROUNDING_LIMIT:
        evidence.append(f"the weight change is small against the client's weights: the median row of '{where}' is "
                        f"known to {worst:.1e} of its size (the rounding of the client's new weights), coarser than "
                        f"the {ROUNDING_LIMIT:g} a witness row of a certificate needs: the exact route certifies few "
                        "samples of it or none (a larger learning rate, or a client computing in float64, would "
                        "certify more)")
    return worst


def _signatures(tensors: Mapping[str, Any], model: Any, evidence: list[str], roundoff: float, cut: bool = False
                ) -> tuple[bool | None, float | None, int | None]:
    """Noise, sparsification and quantisation signatures (module docstring); ``roundoff``: the relative rounding of
    the update's values (its rounding of the K output-bias entries moves their sum by up to ``roundoff sqrt(K)``
    of their norm); ``cut``: the update was clipped by value, which breaks the zero sum of the output bias too."""
    import torch

    noised: bool | None = None
    sparsified: float | None = None
    quantised: int | None = None
    by_size = sorted(tensors.items(), key=lambda kv: kv[1].numel(), reverse=True)
    largest = by_size[0]
    if largest[1].numel() >= QUANTISED_MIN_SIZE and (levels := _levels(largest[1])) <= QUANTISED_LEVELS:
        others = ((name, t) for name, t in by_size[1:] if int(torch.count_nonzero(t)) >= QUANTISED_CONFIRM)
        other = next(others, None)
        if other is None or _levels(other[1]) <= QUANTISED_LEVELS:
            quantised = levels
            evidence.append(f"'{largest[0]}' ({largest[1].numel()} entries) holds only {levels} distinct values"
                            f"{'' if other is None else f', and so does {other[0]!r}'}: the update was quantised")
    if model is None:
        return noised, sparsified, quantised
    from fedleak.attacks.zero_sum import SUM_TOL, relative_sum
    from fedleak.errors import FedleakError
    from fedleak.nets.output_layer import output_layer_names

    try:
        w_name, b_name = output_layer_names(model)
    except FedleakError:
        return noised, sparsified, quantised
    if w_name in tensors:
        w = tensors[w_name].detach()
        live = w[:, (w != 0).any(0)]  # columns of penultimate units that fired for some sample
        if live.numel():
            zeros = float((live == 0).double().mean())
            if zeros > SPARSE_ZERO_FRACTION:
                sparsified = float((torch.cat([t.detach().flatten() for t in tensors.values()]) == 0).double().mean())
                evidence.append(f"{zeros:.0%} of the output layer's live entries are exactly 0 where a cross-entropy "
                                f"update is dense: the update was sparsified ({sparsified:.0%} zeros overall)")
    # sparsification, quantisation and clipping by value break the zero sum too: look for noise only without them
    if b_name is not None and b_name in tensors and sparsified is None and quantised is None and not cut:
        bias = tensors[b_name]
        if bool(bias.detach().any()):
            rel = abs(relative_sum(bias))
            noised = rel > max(SUM_TOL, 2 * roundoff * math.sqrt(bias.numel()))
            if noised:
                evidence.append(f"the output-layer bias change sums to {rel:.2g} of its norm where a cross-entropy "
                                "update sums to 0: noise was added (or the client used weight decay, Adam or "
                                "another loss)")
    return noised, sparsified, quantised


def _levels(t: Any) -> int:
    """The distinct values among a strided sample of ``t``'s entries (:data:`QUANTISED_SAMPLE`). A continuous tensor
    shows more than :data:`QUANTISED_LEVELS` among the first :data:`QUANTISED_GLANCE` of them already (a sort of
    65,536 costs ms)."""
    import torch

    from fedleak.precision import sample_entries

    sample = sample_entries(t, QUANTISED_SAMPLE)
    glance = int(torch.unique(sample_entries(sample, QUANTISED_GLANCE)).numel())
    return glance if glance > QUANTISED_LEVELS else int(torch.unique(sample).numel())


def _summed(tensors: Mapping[str, Any], model: Any, evidence: list[str], n: int | None) -> bool | str:
    """The summed-loss signature of a gradient whose output-layer bias the noise signature read (module
    docstring); :data:`SCALED_UP` where ``n`` examples are reported and a summed loss over them cannot reach it."""
    import torch

    from fedleak.nets.output_layer import output_layer_names

    total = float(tensors[output_layer_names(model)[1]].detach().to(torch.float64).abs().sum())
    if total <= MEAN_BIAS_L1 * (1 + SUMMED_TOL):
        return False
    if n is not None and total > MEAN_BIAS_L1 * n * (1 + SUMMED_TOL):
        evidence.append(f"the output-layer bias gradient's entries add up to {total:.3g} in absolute value, more "
                        f"than a cross-entropy summed over the {n} examples reported can ({MEAN_BIAS_L1 * n:g}): the "
                        "gradient was scaled up (a loss scaled for mixed precision and sent without unscale_, as "
                        "torch.amp.GradScaler leaves it; a learning rate); the exclusivity attack reads it as a "
                        "gradient times an unknown common factor, with the count")
        return SCALED_UP
    evidence.append(f"the output-layer bias gradient's entries add up to {total:.3g} in absolute value, more than a "
                    f"mean cross-entropy gradient's at most {MEAN_BIAS_L1:g}: the client's loss sums over its batch "
                    "(reduction='sum'; the exclusivity attack then takes loss_reduction='sum') or the gradient was "
                    "scaled up")
    return True


def _weight_decay(update: Any, delta: Mapping[str, Any], model: Any) -> dict[str, Any] | None:
    """The weight change without SGD's weight decay, or the gradient without an L2 penalty in the loss, where the
    model's silent units show one (:mod:`fedleak.attacks.exact.decay`, :mod:`fedleak.attacks.exact.penalty`); None
    without a model the exact methods read, or without decay."""
    if model is None:
        return None
    from fedleak.attacks.exact.decay import peel_decay, read_decay
    from fedleak.attacks.exact.noise import step_noises
    from fedleak.attacks.exact.penalty import without_penalty
    from fedleak.errors import FedleakError
    from fedleak.nets.exact_view import exact_view
    from fedleak.updates import GradientUpdate

    if isinstance(update, GradientUpdate):
        peeled = without_penalty(model, update)
        return None if peeled is None else dict(peeled.gradients)
    try:
        view = exact_view(model)
    except FedleakError:
        return None
    if view.fold is not None and view.fold.weight_norms:  # (read by the exact route on the twin's change only)
        return None
    net = view.net
    change = {n: d for n, d in delta.items() if n in update.before and n in update.after}
    noise = step_noises(update.after, change)
    decay = read_decay(net, update.before, change, noise)
    return None if decay is None else peel_decay(decay, update.before, change, noise)[0]
