"""The first Linear layer of a batch's update, read row by row: inputs rebuilt exactly, without a certificate.

For a batch, row ``i`` of the first Linear layer's weight gradient is ``sum_n d_ni [x_n]`` and its bias gradient
``sum_n d_ni`` (``d_ni`` sample ``n``'s gradient at the layer's unit ``i``). Where the activation after the
layer is a ReLU, a unit that fires for one sample only has ``d_ni`` zero for every other sample: its row ratio
``G[i,:] / g[i]`` is that sample's input, whatever the layers after it compute (residual connections,
LayerNorm, attention: what the exclusivity attack cannot read). Rows whose ratios agree (to ``group_tol``) are
grouped; a group of two rows or more is a candidate. Its label is the class whose gradient, recomputed by
autograd at the candidate (the model in the mode it was passed), is parallel on the group's rows to their bias
gradients (``fit_tol``; at a positive scale); a candidate that no class fits is dropped, and so is one whose
scale is not the batch's common one (``1/M`` for the mean loss of a reported batch of ``M``, else the one most
candidates' rows share; ``scale_tol``): that removes the blends of samples that agree on rows (on two classes every
blend of samples sharing their units does). An update rounded to a coarser format than float32 (``rounded``) loosens
every tolerance to its rounding; on two classes the scale test then lets blends through (a third of the inputs
returned on two-class faces in bfloat16), so nothing is returned there. Nothing is certified: the batch's other
rows are not checked, and a blend may still fit.

A FedAvg client's weight change reads the same way: the input stays the same over its local steps, so a unit
that fires for one sample only at every step moves its row by a multiple of that sample's input and its bias by
the same multiple, whatever the learning rate, the number of steps or the momentum. Over several steps (or an
unknown number: ``drifted``) the gradients were taken at moving weights, so no class fits the rows exactly and
no scale is common: the label is the class whose gradient at the weights before fits best, with no tolerance
and no scale checked. That is safe with more than two classes, where the rows of a blend of samples rarely agree
(each unit weighs the samples by its own output weights; where they do, on samples of one label, the blend lies
between them and is left out: :func:`convex_blends`); on two classes (one logit, or two) they agree as often as a
sample's do, and nothing is returned. SGD's weight decay is peeled first (:mod:`fedleak.attacks.row_decay`). Adam
(and signSGD, or a sign-compressed update) moves each entry by its sign times a step of its own normalisation, so
the rows agree on ``sign(x)``: over several steps, where no fit checks a candidate, sign patterns are not returned
(:func:`sign_patterns`; one step of a plain gradient's rows fits no class on them).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedleak.attacks.exact.grouping import ImpliedInputs, group_rows
from fedleak.logits_of import per_sample_logits
from fedleak.nets.layer_calls import FunctionalCalls
from fedleak.reconstruction import Reconstruction, SampleRecovery

F64 = torch.float64
ROUTE = "first-layer (uncertified, batch rows)"
#: the route of inputs read off the rows of an update that looks sparsified or quantised: near the samples, not exact
COMPRESSED_ROUTE = "first-layer (uncertified, rows of a compressed update)"
#: the route of inputs read off the rows of an update in a format coarser than float32: the samples to its rounding
ROUNDED_ROUTE = "first-layer (uncertified, rows of a rounded update)"
HELD_ROUTES = (ROUTE, ROUNDED_ROUTE)  # inputs read off rows as well as the update's values tell them
SIGN_TOL, SIGN_SHARE = 0.05, 0.95  # a candidate with this share of entries within this of -1, 0 or 1: a sign pattern
BLEND_TOL = 1e-4  # a candidate within this (relative) of a convex combination of the others is a blend of them


@dataclass(frozen=True)
class LayerRows:
    """The first Linear layer's rows as an update shows them: ``G`` and ``g``, its weight and bias change (float64;
    for a weight update, ``before - after``), and how to read them: ``batch_size`` (None when not reported),
    ``scale`` the batch's common scale of a sample's rows (``1/M`` for the mean loss of a reported batch; None when
    not known: a learning rate, or no batch size) and ``drifted``, whether the update spans several local steps or
    an unknown number (its gradients taken at moving weights); ``caveat``: why an input the rows agree on may not
    be the sample's (the model changes its input in training mode: :func:`~fedleak.attacks.masked_input.withheld`);
    ``compressed``: why the rows themselves are not the client's (the update looks sparsified or quantised), which
    makes the inputs approximations (:data:`COMPRESSED_ROUTE`); ``rounded``: how the update's values are rounded
    where they carry a format coarser than float32 (half precision, autocast): the inputs are the samples' to within
    that rounding (:mod:`fedleak.precision`); ``other_loss``: why the update is no softmax cross-entropy's gradient
    (its output bias does not sum to zero: multi-label binary cross-entropy, MSE), whose class fits then check
    nothing (:mod:`fedleak.attacks.zero_sum`)."""

    G: torch.Tensor
    g: torch.Tensor
    batch_size: int | None
    scale: float | None
    drifted: bool = False
    caveat: str = ""
    compressed: str = ""
    rounded: str = ""
    other_loss: str = ""

    @property
    def unfitted(self) -> bool:
        """Whether no class's gradient can fit the rows exactly: several local steps, or another loss."""
        return self.drifted or bool(self.other_loss)


def rebuild_rows(model: nn.Module, layer: str, rows: LayerRows, shape: tuple[int, ...], opts,
                 notes: tuple[str, ...], start: float) -> Reconstruction:
    """The inputs a batch's ``rows`` of the first Linear layer (named ``layer``) give (see the module), at most their
    batch size (those of most rows first); ``model``: at the weights the update was taken from; ``opts``:
    ``group_tol``, ``fit_tol`` and ``scale_tol`` (:class:`~fedleak.attacks.first_layer.FirstLayerOptions`)."""
    G, g, batch_size = rows.G, rows.g, rows.batch_size
    idx = torch.nonzero(g != 0).flatten()
    implied = ImpliedInputs(G, idx, g[idx])
    held, scan = implied.held()
    groups = [torch.as_tensor(grp.rows, device=idx.device)
              for grp in group_rows(held, torch.argsort(-g[idx].abs()), opts.group_tol, scan) if len(grp.rows) >= 2]
    groups.sort(key=len, reverse=True)
    X = torch.stack([least_squares(G, g, idx[grp]) for grp in groups]) if groups else G.new_zeros(0, G.shape[1])
    fits = class_fits(model, layer, X.reshape(len(X), *shape), [idx[grp] for grp in groups], g)
    found = [k for k in range(len(groups)) if math.isfinite(fits.residuals[k])]
    signs = sign_patterns(X) if rows.unfitted else torch.zeros(len(X), dtype=torch.bool)
    if not rows.unfitted and rows.rounded and fits.classes <= 2:  # blends pass a scale test as loose as the rounding
        keep, why = [], ""
    elif not rows.unfitted:
        keep = at_common_scale([k for k in found if fits.residuals[k] <= opts.fit_tol], fits.scales, rows.scale,
                               opts.scale_tol, [len(grp) for grp in groups])
        if rows.rounded:  # a tolerance as loose as the rounding lets a blend of samples of one label through
            blends = convex_blends(X, keep, opts.group_tol)
            keep = [k for k in keep if k not in blends]
            if blends:
                notes = (*notes, f"{len(blends)} candidate(s) within the update's rounding of a convex combination of "
                                 "other candidates (blends of samples of one label) were left out")
        why = ("rebuilt from first-layer rows that agree on this input, its label the class whose recomputed "
               "gradient fits them; a batch's rows can agree on a blend of samples, so it is not certified")
    elif fits.classes > 2:
        # what Adam's steps leave of an input (no fit checks them here); under another loss no class need fit at all
        keep = [k for k in (range(len(groups)) if rows.other_loss else found) if not signs[k]]
        blends = convex_blends(X, keep)
        keep = [k for k in keep if k not in blends]
        if blends:
            notes = (*notes, f"{len(blends)} candidate(s) whose rows agree on a convex combination of other "
                             "candidates (blends of samples of one label) were left out")
        if rows.drifted:
            why = ("rebuilt from first-layer rows of a weight update that agree on this input, its label the class "
                   "whose gradient at the weights before fits them best (over several local steps, or an unknown "
                   "number, the gradients were taken at moving weights: no class fits exactly); not certified")
        else:
            why = (f"rebuilt from first-layer rows that agree on this input; {rows.other_loss}: no class's gradient "
                   "checks the rows, and the label is the class whose cross-entropy gradient fits them best, a guess; "
                   "not certified")
    else:  # two classes: blends agree on rows as often as samples do
        keep, why = [], ""
    keep = distinct(X, keep, opts.group_tol)
    if batch_size is not None:
        keep = keep[:batch_size]
    if batch_size is None and not rows.unfitted:
        why += " (the batch size is not known: pass num_examples=1 if the client sent one sample's gradient)"
    why += "".join(f"; {c}" for c in (rows.caveat, rows.compressed, rows.rounded) if c)
    route = COMPRESSED_ROUTE if rows.compressed else ROUNDED_ROUTE if rows.rounded else ROUTE
    dtype = next(model.parameters()).dtype
    samples = tuple(SampleRecovery(fits.labels[k], False, why, witnesses=(len(groups[k]),),
                                   residual=fits.residuals[k], scale=fits.scales[k], route=route) for k in keep)
    if keep:
        missing = ""
    elif signs[found].any():
        missing = ("the rows agree only on sign patterns (nearly every entry -1, 0 or 1): what the steps of a "
                   "sign-based optimizer (Adam, signSGD) or a sign-compressed update leave of any input, not the input "
                   "itself (unless the data are such patterns); nothing returned")
    elif rows.rounded and not rows.unfitted and fits.classes <= 2 and found:
        missing = ("on two classes a blend of samples that share their units fits a class on its rows too, at a scale "
                   f"of its own, and only the scale tells it from a sample; {rows.rounded}, which makes that test too "
                   "loose (on two-class faces in bfloat16 a third of the inputs it let through were blends), so "
                   "nothing is returned")
    elif rows.other_loss and fits.classes <= 2 and groups:
        missing = (f"{rows.other_loss}; under another loss only the agreement of a candidate's rows tells a sample "
                   "from a blend of samples, which with one or two outputs is not enough to go on: nothing returned")
    elif rows.drifted and fits.classes <= 2 and found:
        missing = ("on two classes the first-layer rows of a weight update of several local steps (or an unknown "
                   "number) agree on blends of samples as often as on samples, and nothing tells them apart: nothing "
                   "returned (if the client took one step, say so: WeightUpdate(..., local_steps=1))")
    else:
        missing = ("no two rows of the first Linear layer agree on an input that a class's gradient fits (every "
                   "unit fires for several samples, or its activation is not a ReLU)")
    return Reconstruction(
        inputs=X[keep].reshape(len(keep), *shape).to(dtype).cpu(), labels=torch.tensor([fits.labels[k] for k in keep]),
        certified=torch.zeros(len(keep), dtype=torch.bool), attack="first-layer", samples=samples,
        batch_size=batch_size, seconds=time.perf_counter() - start, notes=notes, missing_reason=missing)


def sign_patterns(X: torch.Tensor, tol: float = SIGN_TOL) -> torch.Tensor:
    """Which candidate inputs (rows of ``X``) are sign patterns: nearly all (:data:`SIGN_SHARE`) entries within
    ``tol`` of -1, 0 or 1, some of them at 1 or -1. Adam divides each entry's step by its own running magnitude, so
    a unit that fired for one sample moves its row by ``sign(x)`` times one step size (less where ``|x|`` is so small
    that Adam's ``eps`` counts), and its rows agree on ``sign(x)``, not on ``x``."""
    if not len(X):
        return torch.zeros(0, dtype=torch.bool)
    near = ((X - X.round().clamp(-1, 1)).abs() <= tol).to(X.dtype).mean(1) >= SIGN_SHARE
    return (near & ((X.abs() - 1).abs() <= tol).any(1)).cpu()


def convex_blends(X: torch.Tensor, keep: list[int], tol: float = BLEND_TOL) -> set[int]:
    """The candidates of ``keep`` (rows of ``X``) within ``tol`` (relative) of a convex combination of the others.
    A unit that fires for several samples of one label weighs them with coefficients of one sign, so where its rows
    agree they agree on a point of the samples' convex hull. A sample is no convex combination of other samples and
    such blends (a blend holding it would need a negative weight on its other part); it is one only where another
    candidate lies beyond it, a blend with coefficients of both signs (samples of different labels, whose rows
    rarely agree with more than two classes): then it is left out too, a sample lost, never a blend returned."""
    from scipy.optimize import nnls  # loaded here: scipy's import costs an attack that never gets here 0.3 s

    out: set[int] = set()
    if len(keep) < 3:
        return out
    A = X[keep].double().cpu().numpy()
    stiff = 100.0 * float(np.linalg.norm(A, axis=1).max())  # the weights' sum held to 1 (a row of this weight)
    for pos, k in enumerate(keep):
        others = np.delete(A, pos, axis=0)
        system = np.vstack([others.T, np.full((1, len(others)), stiff)])
        w, _ = nnls(system, np.append(A[pos], stiff))
        if np.linalg.norm(others.T @ w - A[pos]) <= tol * np.linalg.norm(A[pos]) and abs(w.sum() - 1) <= 1e-3:
            out.add(k)
    return out


def least_squares(G: torch.Tensor, g: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The input ``x`` that best explains ``rows`` of the layer as ``G[i] = g[i] x`` (least squares): each row's
    ratio weighted by its bias change squared, so that the rows a sample moved most, whose entries the client's
    rounding disturbs least relative to them, count most (for a weight change; a gradient's rows agree anyway)."""
    w = g[rows]
    return (w @ G[rows]) / (w @ w)


@dataclass(frozen=True)
class ClassFits:
    """Per candidate: the best-fitting class (``labels``), that fit's relative residual (inf where no class fits at
    a positive scale) and scale (nan there); ``classes``: how many classes the model tells apart."""

    labels: list[int]
    residuals: list[float]
    scales: list[float]
    classes: int


def class_fits(model: nn.Module, layer: str, X: torch.Tensor, rows: list[torch.Tensor], g: torch.Tensor
               ) -> ClassFits:
    """Per candidate input (``X``, one per row of ``rows``): the class whose recomputed gradient at the output of
    the Linear layer ``layer`` (a module, or ``F.linear`` of the parameter so named) best fits the observed bias
    gradients ``g`` on its rows, that fit's relative residual and scale (:class:`ClassFits`). One forward and
    backward pass per class over all candidates."""
    n = len(X)
    if n == 0:
        return ClassFits([], [], [], 0)
    first = next(model.parameters())
    x = X.to(first.device, first.dtype)
    best = torch.full((n,), math.inf, dtype=F64)
    label = torch.zeros(n, dtype=torch.long)
    scale = torch.full((n,), math.nan, dtype=F64)
    caught: list[torch.Tensor] = []
    parameters = dict(model.named_parameters())
    # the layer's output: a module's, hooked; F.linear's of the parameter ``layer``, caught by it
    functional = FunctionalCalls({id(parameters[layer]): layer} if layer in parameters else {}, first=True)
    hooks = [] if layer in parameters else [
        model.get_submodule(layer).register_forward_hook(lambda mod, args, out: caught.append(out))]
    try:
        with torch.enable_grad(), functional:
            logits = per_sample_logits(model(x), len(x))
    finally:
        for hook in hooks:
            hook.remove()
    z = (caught or [call.output for call in functional.calls])[0]
    classes = 2 if logits.shape[1] == 1 else logits.shape[1]
    for c in range(classes):
        target = torch.full((n,), c, dtype=torch.long, device=logits.device)
        loss = (F.binary_cross_entropy_with_logits(logits[:, 0], target.to(logits.dtype), reduction="sum")
                if logits.shape[1] == 1 else F.cross_entropy(logits, target, reduction="sum"))
        dz = torch.autograd.grad(loss, z, retain_graph=c < classes - 1)[0].to(F64).cpu()  # per sample: a sum
        for k, r in enumerate(rows):
            obs, pred = g[r].cpu(), dz[k, r.cpu()]
            s = float(obs @ pred) / max(float(pred @ pred), 1e-300)
            res = float((obs - s * pred).norm()) / max(float(obs.norm()), 1e-300) if s > 0 else math.inf
            if res < best[k]:
                best[k], label[k], scale[k] = res, c, s
    return ClassFits(label.tolist(), best.tolist(), scale.tolist(), classes)


def at_common_scale(keep: list[int], scales: list[float], common: float | None, tol: float,
                    rows: list[int]) -> list[int]:
    """The candidates of ``keep`` whose fitted scale is the batch's ``common`` one (within ``tol``, relative): ``1/M``
    for the mean loss of a reported batch of ``M``; where it is not known (None), the scale that the candidates of
    most rows share (``rows``: each candidate's; a sample's scale is borne by all its exclusive rows, while the many
    small groups of blends, at a tolerance as loose as a half-precision update needs, can share one of their own).
    On two classes every loss vector lies on one line, so a blend of samples that share their units fits a class
    on those rows too, but at a scale of its own (its loss vector is not the sum of theirs)."""
    if not keep:
        return keep
    if common is None:
        common = max((scales[k] for k in keep),
                     key=lambda v: sum(rows[j] for j in keep if abs(scales[j] / v - 1) <= tol))
    return [k for k in keep if abs(scales[k] / common - 1) <= tol]


def distinct(X: torch.Tensor, keep: list[int], tol: float) -> list[int]:
    """``keep`` without the candidates within ``tol`` (relative) of one kept before them (a sample whose rows fell
    into two groups)."""
    out: list[int] = []
    for k in keep:
        if all(float((X[k] - X[j]).norm()) > tol * max(float(X[j].norm()), 1e-300) for j in out):
            out.append(k)
    return out
