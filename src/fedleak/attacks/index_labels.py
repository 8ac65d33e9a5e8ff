"""Label inference from the indices a top-k client reveals: the sparsification side channel of OLIVE.

Kato, Cao & Yoshikawa, "OLIVE: Oblivious federated learning on trusted execution environment against the risk
of sparsification" (VLDB 2023) show that a client which sends only the top-k entries of its update leaks its
labels through *which* entries it sends, even when their values are encrypted (the positions show in the
sparse encoding, or in a TEE's memory-access pattern). This module is that attack, on index sets only:
``indices`` maps a parameter name to the flat positions revealed in that tensor (or is a sparse update, such as
the ``top-k`` defense's output, whose nonzeros are the positions).

Two rules:

* **output layer** (data-free). For cross-entropy the output layer's gradient row of class ``c`` is
  ``sum_i (p_ic - [y_i = c]) h_i``; for a class in the batch ``|p_ic - 1|`` is large, for an absent class
  ``p_ic`` is small, so the rows of present classes win the top-k. ``score_c`` is the fraction of row ``c``'s
  entries (its weight row and bias entry) among the revealed positions, and the set is the classes above the
  largest gap in the sorted scores. On a trained network a confusable absent class's row is as large as the
  present one's, so the best class stays right but the set size suffers.
* **profile** (OLIVE's use of the server's public data). :func:`build_index_profile` records, for every class
  ``c``, the frequency ``f_c(i)`` with which position ``i`` is in the top-k of a single-class batch (smoothed
  towards the ratio). A batch of the classes ``S`` is modelled as revealing position ``i`` with probability
  ``q_S(i) = mean_{c in S} f_c(i)`` (the top-k budget is shared), independently, so the log-likelihood of the
  revealed set ``X`` is ``sum_{i in X} log q_S(i) + sum_{i not in X} log(1 - q_S(i))``; the second sum is
  taken as ``-sum_{i not in X} q_S(i)``, which needs only per-class totals. Classes are added greedily while
  the likelihood grows. ``score_c`` (per revealed position): for a member of the set, what removing it costs;
  for another class, what adding it gains (negative once the fit has stopped). Scoring each class instead by the
  mean log-odds ``log f_c(i) / mean_d f_d(i)`` of the revealed positions finds the best class as well but sizes
  the set far worse (Fashion-MNIST, 2 labels in a batch of 8, untrained MLP 1024, top 0.1 %: 0.62 against 0.95
  exact-set accuracy).

Without ``num_labels`` a set holds at least one class; the output-layer rule never predicts all ``K``.
:func:`score_label_inference` scores predicted sets against the truth, beside a random guess of a set of the
same size (computed exactly).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch import nn

from fedleak.defenses.base import make_defense
from fedleak.errors import OptionError
from fedleak.nets.output_layer import output_layer_names
from fedleak.updates import batch_loss, trainable_parameters
from fedleak.validation import check_float, check_int, check_labels, check_seed, describe

PositionMap = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class IndexLabelInference:
    """The labels inferred from one client's revealed indices.

    ``labels``: the predicted set of classes, sorted; ``scores``: every class's score (higher: more likely in
    the batch); ``rule``: ``"output-layer"`` or ``"profile"``; ``set_size``: how the set size was chosen
    (``"given"``: ``num_labels``; ``"largest-gap"``: the largest gap in the sorted scores; ``"likelihood"``:
    until adding a class no longer raises the profile likelihood); ``notes``: what limited the inference.
    """

    labels: tuple[int, ...]
    scores: tuple[float, ...]
    rule: str
    set_size: str
    notes: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class IndexProfile:
    """Per-class top-k frequencies of every parameter position, from single-class batches of public data.

    ``frequencies[c, i]``: the fraction of the ``batches`` single-class batches of class ``c`` (each of
    ``batch_size`` samples) whose top-``ratio`` update sent position ``i``; positions are the model's trainable
    parameters flattened and concatenated in ``names`` order (``sizes`` entries each).
    """

    names: tuple[str, ...]
    sizes: tuple[int, ...]
    frequencies: torch.Tensor
    ratio: float
    batch_size: int
    batches: int

    def __post_init__(self) -> None:
        f = self.frequencies
        if len(self.names) != len(self.sizes) or not isinstance(f, torch.Tensor) or f.ndim != 2 \
                or f.shape[1] != sum(self.sizes) or f.shape[0] < 2:
            raise OptionError(f"an IndexProfile needs one size per name and K >= 2 rows of sum(sizes) = "
                              f"{sum(self.sizes)} frequencies, got {len(self.names)} names, {len(self.sizes)} sizes "
                              f"and frequencies of shape {tuple(getattr(f, 'shape', ()))}")
        if not bool(((f >= 0) & (f <= 1)).all()) or not 0 < self.ratio <= 1 or self.batches < 1:
            raise OptionError("an IndexProfile needs frequencies in [0, 1], a ratio in (0, 1] and batches >= 1")

    @cached_property
    def smoothed(self) -> torch.Tensor:
        """``K x P`` frequencies with one pseudo-batch at the base rate ``ratio`` (no position is impossible)."""
        return (self.frequencies.double() * self.batches + self.ratio) / (self.batches + 1)

    @cached_property
    def totals(self) -> torch.Tensor:
        """``K``: the sum of each class's smoothed frequencies (its expected number of positions sent)."""
        return self.smoothed.sum(1)


# ---------------------------------------------------------------------------------------------------------
# Revealed positions


def parameter_sizes(model: nn.Module) -> dict[str, int]:
    """The number of entries of each trainable parameter, in the model's order."""
    return {name: p.numel() for name, p in trainable_parameters(model).items()}


def revealed_positions(model: nn.Module, indices: PositionMap) -> dict[str, torch.Tensor]:
    """``indices`` checked against the model: sorted, distinct flat positions per parameter.

    Each value is an integer tensor of flat positions in that parameter, or a floating-point tensor of the
    parameter's shape (a sparse update) whose nonzero entries are the positions. An unknown name, a position
    outside ``[0, numel)``, a wrong shape or nothing revealed at all raises :class:`~fedleak.errors.OptionError`.
    """
    params = trainable_parameters(model)
    if not isinstance(indices, Mapping) or not indices:
        raise OptionError(f"indices must be a non-empty mapping from parameter name to positions, got "
                          f"{describe(indices)}")
    out: dict[str, torch.Tensor] = {}
    for name, value in indices.items():
        if name not in params:
            known = list(params)
            raise OptionError(f"indices name a parameter '{name}' the model does not have; its trainable "
                              f"parameters: {known[:12]}{' ...' if len(known) > 12 else ''}")
        if not isinstance(value, torch.Tensor):
            raise OptionError(f"indices['{name}'] must be a tensor of positions or a sparse update, got "
                              f"{describe(value)}")
        size = params[name].numel()
        if value.is_floating_point():
            if tuple(value.shape) != tuple(params[name].shape):
                raise OptionError(f"indices['{name}'] is a sparse update of shape {tuple(value.shape)}, but the "
                                  f"parameter has shape {tuple(params[name].shape)}")
            positions = torch.nonzero(value.detach().flatten()).flatten()
        elif value.dtype == torch.bool or value.is_complex():
            raise OptionError(f"indices['{name}'] must hold integer positions or floats, got dtype {value.dtype}")
        else:
            positions = value.detach().flatten().long()
            outside = positions[(positions < 0) | (positions >= size)]
            if outside.numel():
                raise OptionError(f"indices['{name}'] holds position {int(outside[0])}, outside [0, {size - 1}] "
                                  f"(the parameter has {size} entries)")
        out[name] = torch.unique(positions.cpu())
    if sum(p.numel() for p in out.values()) == 0:
        raise OptionError(f"indices reveal no position at all (parameters given: {list(indices)})")
    return out


def flat_positions(positions: PositionMap, sizes: Mapping[str, int]) -> torch.Tensor:
    """Per-parameter positions as positions in the concatenation of the parameters (``sizes`` order)."""
    offsets = dict(zip(sizes, np.cumsum([0, *sizes.values()]).tolist()))
    return torch.cat([positions[n] + offsets[n] for n in positions])


# ---------------------------------------------------------------------------------------------------------
# Profiles from public data


def sent_count(ratio: float, total: int) -> int:
    """How many of ``total`` entries a top-``ratio`` client sends (the ``top-k`` defense's own count)."""
    return make_defense("top-k", ratio=ratio).kept(total)


def build_index_profiles(
    model: nn.Module, public_x: torch.Tensor, public_y: torch.Tensor, ratios: Sequence[float], *,
    batch_size: int = 8, batches: int = 16, seed: int = 0,
) -> dict[float, IndexProfile]:
    """One :class:`IndexProfile` per top-k ratio, all from the same gradients: ``batches`` single-class batches
    of ``batch_size`` public samples per class (drawn without replacement within a batch, seeded), each batch's
    mean-loss gradient reduced to its ``k`` largest-magnitude positions (``k`` as the ``top-k`` defense counts).
    ``public_y`` must hold at least ``batch_size`` samples of every class of the model's output layer."""
    batch_size = check_int("batch_size", batch_size, low=1, error=OptionError)
    batches = check_int("batches", batches, low=1, error=OptionError)
    rng = np.random.default_rng(check_seed("seed", seed, error=OptionError))
    ratios = [check_float("ratio", r, low=0.0, high=1.0, error=OptionError) for r in ratios]
    if not ratios or min(ratios) <= 0:
        raise OptionError(f"ratios must be top-k ratios in (0, 1], got {ratios}")
    params = trainable_parameters(model)
    sizes = {n: p.numel() for n, p in params.items()}
    total = sum(sizes.values())
    kept = {r: sent_count(r, total) for r in ratios}
    num_classes = int(params[output_layer_names(model)[0]].shape[0])
    labels = torch.from_numpy(check_labels(public_y, num_classes, name="public_y", error=OptionError))
    if not isinstance(public_x, torch.Tensor) or len(public_x) != len(labels):
        raise OptionError(f"public_x must be a tensor with one sample per label of public_y ({len(labels)}), got "
                          f"{tuple(public_x.shape) if isinstance(public_x, torch.Tensor) else describe(public_x)}")
    counts = {r: torch.zeros(num_classes, total) for r in ratios}
    for c in range(num_classes):
        pool = torch.nonzero(labels == c).flatten().numpy()
        if len(pool) < batch_size:
            raise OptionError(f"public_y holds {len(pool)} sample(s) of class {c}; a profile needs "
                              f"batch_size={batch_size} of every class")
        for _ in range(batches):
            pick = torch.from_numpy(rng.choice(pool, size=batch_size, replace=False))
            grads = torch.autograd.grad(batch_loss(model, public_x[pick], labels[pick]), list(params.values()),
                                        materialize_grads=True)
            largest = torch.topk(torch.cat([g.detach().flatten().abs() for g in grads]), max(kept.values())).indices
            for r, k in kept.items():  # sorted by magnitude: each ratio's top-k is a prefix
                counts[r][c, largest[:k]] += 1
    return {r: IndexProfile(tuple(sizes), tuple(sizes.values()), counts[r] / batches, r, batch_size, batches)
            for r in ratios}


def build_index_profile(model: nn.Module, public_x: torch.Tensor, public_y: torch.Tensor, ratio: float, *,
                        batch_size: int = 8, batches: int = 16, seed: int = 0) -> IndexProfile:
    """The :class:`IndexProfile` of ``model`` for a top-``ratio`` client (see :func:`build_index_profiles`)."""
    return build_index_profiles(model, public_x, public_y, [ratio], batch_size=batch_size, batches=batches,
                                seed=seed)[float(ratio)]


# ---------------------------------------------------------------------------------------------------------
# The two rules


def output_layer_scores(model: nn.Module, positions: PositionMap) -> tuple[np.ndarray, list[str]]:
    """Per class, the fraction of its output-layer row (weight row and bias entry) among ``positions``."""
    w_name, b_name = output_layer_names(model)
    params = trainable_parameters(model)
    if w_name not in params:
        raise OptionError(f"the output layer's weight '{w_name}' is not trainable; the output-layer rule needs it")
    num_classes, hidden = params[w_name].shape
    hits = np.zeros(num_classes)
    if w_name in positions:
        hits += np.bincount((positions[w_name] // hidden).numpy(), minlength=num_classes)
    row = hidden
    if b_name is not None and b_name in params:
        row += 1
        if b_name in positions:
            hits += np.bincount(positions[b_name].numpy(), minlength=num_classes)
    notes = [] if hits.any() else ["no position of the output layer was revealed: the scores carry no information"]
    return hits / row, notes


def largest_gap(scores: np.ndarray, num_labels: int | None) -> tuple[tuple[int, ...], str]:
    """The ``num_labels`` best classes, or those above the largest gap in the sorted scores (1 to K-1)."""
    order = np.argsort(-scores, kind="stable")
    if num_labels is None:
        ranked = scores[order]
        size, how = int(np.argmax(ranked[:-1] - ranked[1:])) + 1, "largest-gap"
    else:
        size, how = num_labels, "given"
    return tuple(sorted(int(c) for c in order[:size])), how


def profile_fit(profile: IndexProfile, revealed: torch.Tensor,
                num_labels: int | None) -> tuple[tuple[int, ...], np.ndarray, str]:
    """The greedy mixture fit of the module doc: the chosen set ``S``, every class's score, how the size was
    chosen. A member's score is what removing it from ``S`` costs, another class's what adding it gains, in
    log-likelihood per revealed position (``S`` minus its only member is the mixture of every class)."""
    f = profile.smoothed[:, revealed]  # K x |X|
    unrevealed = profile.totals - f.sum(1)  # K: expected positions of each class that were not revealed
    num_classes, per = f.shape[0], max(1, f.shape[1])

    def fit(members: list[int]) -> float:
        members = members or list(range(num_classes))
        return float(f[members].mean(0).log().sum() - unrevealed[members].mean())

    chosen: list[int] = []
    last = -math.inf
    acc = torch.zeros(f.shape[1], dtype=f.dtype)
    while len(chosen) < (num_labels or num_classes):
        rest = [c for c in range(num_classes) if c not in chosen]
        size = len(chosen) + 1
        fits = (((acc + f[rest]) / size).log().sum(1) - (unrevealed[chosen].sum() + unrevealed[rest]) / size).numpy()
        best = int(np.argmax(fits))
        if num_labels is None and chosen and fits[best] <= last:
            break
        chosen.append(rest[best])
        acc += f[rest[best]]
        last = float(fits[best])
    scores = np.array([last - fit([m for m in chosen if m != c]) if c in chosen else fit([*chosen, c]) - last
                       for c in range(num_classes)]) / per
    return tuple(sorted(chosen)), scores, "likelihood" if num_labels is None else "given"


def infer_labels_from_indices(
    model: nn.Module, indices: PositionMap, *, num_labels: int | None = None, profile: IndexProfile | None = None,
) -> IndexLabelInference:
    """The classes in a top-k client's batch, from the positions it revealed (OLIVE's side channel).

    ``indices``: parameter name -> flat positions (an integer tensor) or a sparse update (a float tensor whose
    nonzeros are the positions). ``num_labels``: the number of distinct classes, when the attacker knows it.
    ``profile``: an :class:`IndexProfile` of the same model (:func:`build_index_profile`), which switches from
    the data-free output-layer rule to the profile rule.
    """
    positions = revealed_positions(model, indices)
    num_classes = int(trainable_parameters(model)[output_layer_names(model)[0]].shape[0])
    if num_labels is not None:
        num_labels = check_int("num_labels", num_labels, low=1, high=num_classes, error=OptionError)
    if profile is None:
        scores, notes = output_layer_scores(model, positions)
        labels, how = largest_gap(scores, num_labels)
        if notes:  # nothing to rank by
            labels = ()
        return IndexLabelInference(labels, tuple(scores.tolist()), "output-layer", how, tuple(notes))
    sizes = parameter_sizes(model)
    if tuple(sizes) != profile.names or tuple(sizes.values()) != profile.sizes:
        raise OptionError(f"profile was built for a model with {len(profile.names)} parameter tensors of "
                          f"{sum(profile.sizes)} entries, this one has {len(sizes)} of {sum(sizes.values())} "
                          "(or other names or shapes); build the profile with this model")
    revealed = flat_positions(positions, sizes)
    expected = sent_count(profile.ratio, sum(profile.sizes))
    notes = []
    if not expected / 2 <= len(revealed) <= expected * 2:
        notes.append(f"{len(revealed)} positions revealed, but the profile models a top-k client sending "
                     f"{expected} (ratio {profile.ratio:g}); build the profile at the client's ratio")
    labels, gains, how = profile_fit(profile, revealed, num_labels)
    return IndexLabelInference(labels, tuple(gains.tolist()), "profile", how, tuple(notes))


# ---------------------------------------------------------------------------------------------------------
# Scoring against the truth


@dataclass(frozen=True)
class LabelInferenceScore:
    """Label-set inference over ``batches`` batches, beside a random guess of a set of the same size.

    ``exact``: the fraction of batches whose set is predicted exactly; ``presence``: the balanced accuracy
    (mean of the true-positive and true-negative rates, pooled over every batch and class) of "class ``c`` is
    in the batch"; ``jaccard``: the mean Jaccard index of predicted and true sets. ``random_*``: the same for
    a guess of ``len(predicted)`` classes drawn uniformly at random, computed exactly (expectations).
    """

    batches: int
    num_classes: int
    exact: float
    presence: float
    jaccard: float
    random_exact: float
    random_presence: float
    random_jaccard: float

    def to_dict(self) -> dict[str, float | int]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


def _label_set(labels: Iterable[int], num_classes: int, what: str) -> frozenset[int]:
    if isinstance(labels, torch.Tensor):
        labels = labels.flatten().tolist()
    if isinstance(labels, (str, bytes)) or not isinstance(labels, Iterable):
        raise OptionError(f"{what} must be a collection of class indices, got {describe(labels)}")
    return frozenset(check_int(what, c, low=0, high=num_classes - 1, error=OptionError) for c in labels)


def _random_jaccard(num_classes: int, size: int, true: int) -> float:
    """E[|S & T| / |S | T|] for a uniform random ``size``-set S and a fixed ``true``-set T (hypergeometric)."""
    total = math.comb(num_classes, size)
    expected = 0.0
    for i in range(max(0, size + true - num_classes), min(size, true) + 1):
        union = size + true - i
        value = 1.0 if union == 0 else i / union
        expected += math.comb(true, i) * math.comb(num_classes - true, size - i) / total * value
    return expected


def score_label_inference(predicted_sets: Sequence[Iterable[int]], true_sets: Sequence[Iterable[int]],
                          num_classes: int) -> LabelInferenceScore:
    """Exact-set accuracy, balanced presence accuracy and Jaccard of ``predicted_sets`` against ``true_sets``
    (one set of class indices per batch), and of a random guess of each predicted set's size."""
    num_classes = check_int("num_classes", num_classes, low=2, error=OptionError)
    if len(predicted_sets) != len(true_sets) or not true_sets:
        raise OptionError(f"predicted_sets and true_sets must be equally long and non-empty, got "
                          f"{len(predicted_sets)} and {len(true_sets)}")
    exact = jaccard = r_exact = r_jaccard = 0.0
    tp = tn = r_tp = r_tn = pos = neg = 0.0
    for p_raw, t_raw in zip(predicted_sets, true_sets):
        pred = _label_set(p_raw, num_classes, "a predicted label")
        true = _label_set(t_raw, num_classes, "a true label")
        s, t, hit = len(pred), len(true), len(pred & true)
        exact += pred == true
        union = len(pred | true)
        jaccard += 1.0 if union == 0 else hit / union
        r_exact += 1.0 / math.comb(num_classes, s) if s == t else 0.0
        r_jaccard += _random_jaccard(num_classes, s, t)
        tp += hit
        tn += num_classes - union
        r_tp += s * t / num_classes
        r_tn += (num_classes - s) * (num_classes - t) / num_classes
        pos += t
        neg += num_classes - t
    n = len(true_sets)

    def balanced(true_pos: float, true_neg: float) -> float:  # the mean of the rates that are defined
        rates = [count / total for count, total in ((true_pos, pos), (true_neg, neg)) if total]
        return float(np.mean(rates))

    return LabelInferenceScore(n, num_classes, exact / n, balanced(tp, tn), jaccard / n, r_exact / n,
                               balanced(r_tp, r_tn), r_jaccard / n)
