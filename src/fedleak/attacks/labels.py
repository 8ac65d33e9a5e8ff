"""Label inference from the output layer of an update (iDLG and its batch extension).

With cross-entropy, the output layer's bias gradient of sample ``i`` is ``p_i - onehot(y_i)``: the true
class is the only negative entry. For one sample (iDLG) the label is therefore the most negative entry
of the output-bias gradient, or, without a bias, of the output weight gradient's row sums (the
penultimate activations are non-negative after a ReLU or sigmoid).

For a batch of ``M`` the update is ``s * sum_i (p_i - onehot(y_i))`` with an unknown positive scale ``s``
(``1/M`` for a mean-loss gradient, ``lr/M`` for a one-step weight delta). A class absent from the batch
gets ``s * sum_i p_ic > 0``; a class with ``n_c`` samples gets ``s * (sum_i p_ic - n_c)``. Assuming the
network's predictions are roughly the same for every class it does not see (true of an untrained or
lightly trained network), the mean of the positive entries ``u`` estimates ``s * sum_i p_ic`` and
``n_c`` is proportional to ``u - d_c``. The counts are normalised to ``M`` (largest remainders), and
every class with a negative entry gets at least one sample. Nothing here depends on ``s``, so the same
rule serves gradients and weight deltas of unknown learning rate. Under class weights ``w``
(``F.cross_entropy(..., weight=w)``) every sample's term is weighed by its label's weight, so ``u - d_c`` is
proportional to ``w_c n_c`` and the rule divides it by ``w_c``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from fedleak.errors import FedleakError
from fedleak.nets.output_layer import output_layer_names
from fedleak.reconstruction import Reconstruction


def class_signal(model: nn.Module, update: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Per-class entries ``d_c`` (K,) whose negative values mark classes in the batch (scale unknown); a
    :class:`FedleakError` saying what to pass where the update holds no gradient of the output layer (a frozen one,
    as FedBABU's clients keep it)."""
    w_name, b_name = output_layer_names(model)
    if b_name is not None and b_name in update:
        return update[b_name].detach().to(torch.float64).flatten()
    if w_name not in update:
        raise FedleakError(f"the update has no gradient of the output layer '{w_name}' (frozen, requires_grad=False, "
                           "or left out), from which the batch's labels and their count are read: pass labels= and "
                           "batch_size= where they are known, or learn the labels (dlg, or learn_labels=True)")
    return update[w_name].detach().to(torch.float64).sum(1)


def reads_classes(model: nn.Module, update: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``update`` holds a gradient of the output layer, which :func:`class_signal` reads."""
    return any(name is not None and name in update for name in output_layer_names(model))


def infer_label_counts(signal: torch.Tensor, batch_size: int, known: torch.Tensor | None = None,
                       class_weights: tuple[float, ...] | None = None) -> np.ndarray:
    """Label histogram (K,) of a batch of ``batch_size`` from the per-class signal (see module doc).

    ``known``: labels already established (e.g. certified by the exclusivity attack); their counts are
    lower bounds. ``class_weights``: the client's cross-entropy's, which weigh every class's signal.
    """
    if batch_size < 1:
        raise FedleakError(f"batch_size must be at least 1, got {batch_size}")
    d = signal.detach().to(torch.float64).cpu().numpy()
    K = d.shape[0]
    present = d < 0
    pos = d[d > 0]
    u = float(pos.mean()) if pos.size else 0.0
    weight = np.clip(u - d, 0.0, None)
    if class_weights is not None:
        weight = weight / np.asarray(class_weights, dtype=np.float64)[:K]
    floor_counts = np.zeros(K, dtype=np.int64)
    if known is not None and len(known):
        floor_counts = np.maximum(floor_counts, np.bincount(known.numpy().astype(np.int64), minlength=K)[:K])
    # every class with a negative entry holds at least one sample (as many as the batch allows)
    order = np.argsort(d)
    for c in order:
        if present[c] and floor_counts.sum() < batch_size and floor_counts[c] == 0:
            floor_counts[c] = 1
    if weight.sum() <= 0:
        weight = present.astype(np.float64) + 1e-12
    target = weight / weight.sum() * batch_size
    counts = np.maximum(np.floor(target).astype(np.int64), floor_counts)
    while counts.sum() > batch_size:  # drop from the classes most above their target
        excess = np.where(counts > floor_counts, counts - target, -np.inf)
        counts[int(np.argmax(excess))] -= 1
    while counts.sum() < batch_size:  # largest remainders
        counts[int(np.argmax(target - counts))] += 1
    return counts


def infer_labels(
    model: nn.Module, update: Mapping[str, torch.Tensor], batch_size: int, known: torch.Tensor | None = None,
    class_weights: tuple[float, ...] | None = None,
) -> torch.Tensor:
    """Labels (sorted by class) of a batch: iDLG's rule for one sample, the count rule for a batch (with the
    client's ``class_weights``)."""
    signal = class_signal(model, update)
    if batch_size == 1 and (known is None or len(known) == 0):
        return torch.tensor([int(torch.argmin(signal))], dtype=torch.long)
    counts = infer_label_counts(signal, batch_size, known, class_weights)
    return torch.repeat_interleave(torch.arange(len(counts)), torch.from_numpy(counts)).long()


NEGATED_MIN_CLASSES = 4  # fewer, and a column shared by samples of the other labels has one positive entry by nature
#: what an update that reads as a gradient's negative is said to be, and what to do with it
NEGATED_HINT = ("the update reads as the negative of a cross-entropy gradient: {evidence}; a weight change new - old "
                "(minus the learning rate times the gradient) reads so: pass it as a WeightUpdate (before and after), "
                "read it as a weight change (kind='change'), or negate it (a confident model trained with label "
                "smoothing can read so too)")


@dataclass(frozen=True)
class ColumnSigns:
    """The output layer's columns of single-sample units: ``one_negative`` of them with one negative entry (a
    gradient's), ``one_positive`` with one positive entry (its negative's)."""

    one_negative: int
    one_positive: int

    @property
    def negated(self) -> bool:
        return self.one_positive > self.one_negative


def column_signs(model: nn.Module, update: Mapping[str, torch.Tensor]) -> ColumnSigns | None:
    """The :class:`ColumnSigns` of ``update``'s output layer, or None where they are not read (fewer than
    :data:`NEGATED_MIN_CLASSES` classes, or no output layer found).

    A penultimate unit that fires for one sample has the output-weight column ``s a (p - onehot(y))``: one negative
    entry, the others positive. Negated, it has one positive entry and the others negative. A gradient whose output
    layer holds more columns of the second kind than of the first reads as negated. Measured at initialisation
    (fedleak's MLPs of one and two hidden layers and a CNN, three seeds, batches of 1-64, raw and standardised
    inputs): on digits and Fashion-MNIST (ten classes) every one of 216 gradients had more of the first kind and
    every negated one more of the second; on three classes (MNI152) 5 of 108 gradients had more of the second kind
    (a column two samples of two other labels share has one positive entry there too), so three classes are not
    read."""
    try:
        w_name, _ = output_layer_names(model)
    except FedleakError:
        return None
    G = update.get(w_name)
    if not isinstance(G, torch.Tensor) or G.ndim != 2 or G.shape[0] < NEGATED_MIN_CLASSES:
        return None
    G = G.detach()
    neg, pos = (G < 0).sum(0), (G > 0).sum(0)
    k = G.shape[0]
    return ColumnSigns(int(((neg == 1) & (pos == k - 1)).sum()), int(((pos == 1) & (neg == k - 1)).sum()))


def negated_columns(model: nn.Module, update: Mapping[str, torch.Tensor]) -> str:
    """Why ``update`` reads as the negative of a cross-entropy gradient, in words (:func:`column_signs`), or empty."""
    signs = column_signs(model, update)
    if signs is None or not signs.negated:
        return ""
    return NEGATED_HINT.format(evidence=f"{signs.one_positive} of its output layer's columns have one positive "
                                        f"entry, {signs.one_negative} one negative entry, where a gradient's have one "
                                        "negative entry")


def with_negated_hint(model: nn.Module, observed: dict[str, torch.Tensor], rec: Reconstruction) -> Reconstruction:
    """``rec``, where it rebuilt nothing and the gradient reads as a gradient's negative
    (:func:`negated_columns`), with that reading in its missing reason."""
    hint = negated_columns(model, observed) if not len(rec) else ""
    return replace(rec, missing_reason="; ".join(filter(None, (rec.missing_reason, hint)))) if hint else rec
