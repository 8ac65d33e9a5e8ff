"""The first Linear layer of a batch's gradient, read row by row: inputs rebuilt exactly, without a certificate.

For a batch, row ``i`` of the first Linear layer's weight gradient is ``sum_n d_ni [x_n]`` and its bias gradient
``sum_n d_ni`` (``d_ni`` sample ``n``'s gradient at the layer's unit ``i``). Where the activation after the
layer is a ReLU, a unit that fires for one sample only has ``d_ni`` zero for every other sample: its row ratio
``G[i,:] / g[i]`` is that sample's input, whatever the layers after it compute (residual connections,
LayerNorm, attention: what the exclusivity attack cannot read). Rows whose ratios agree (to ``group_tol``) are
grouped; a group of two rows or more is a candidate. Its label is the class whose gradient, recomputed by
autograd at the candidate (the model in the mode it was passed), is parallel on the group's rows to their bias
gradients (``fit_tol``; at a positive scale); a candidate that no class fits is dropped, and so is one whose
scale is not the batch's common one (``1/M`` for the mean loss of a reported batch of ``M``, ``scale_tol``):
that removes the blends of samples that agree on rows (on two classes every blend of samples sharing their
units does). Nothing is certified: the batch's other rows are not checked, and a blend may still fit.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn
from torch.nn import functional as F

from fedleak.attacks.exact.grouping import ImpliedInputs, group_rows
from fedleak.reconstruction import Reconstruction, SampleRecovery

F64 = torch.float64
ROUTE = "first-layer (uncertified, batch rows)"


def rebuild_rows(model: nn.Module, layer: nn.Linear, G: torch.Tensor, g: torch.Tensor, shape: tuple[int, ...],
                 batch_size: int | None, opts, notes: tuple[str, ...], start: float) -> Reconstruction:
    """The inputs a batch's first-layer rows give (see the module), at most ``batch_size`` (those of most rows
    first); ``G``, ``g``: the layer's weight and bias gradients (float64); ``opts``: ``group_tol``, ``fit_tol`` and
    ``scale_tol`` (:class:`~fedleak.attacks.first_layer.FirstLayerOptions`)."""
    idx = torch.nonzero(g != 0).flatten()
    rows = ImpliedInputs(G, idx, g[idx])
    held, scan = rows.held()
    groups = [torch.as_tensor(grp.rows, device=idx.device)
              for grp in group_rows(held, torch.argsort(-g[idx].abs()), opts.group_tol, scan) if len(grp.rows) >= 2]
    groups.sort(key=len, reverse=True)
    X = torch.stack([held.mean(grp) for grp in groups]) if groups else torch.zeros(0, G.shape[1], dtype=F64)
    labels, residuals, scales = class_fits(model, layer, X.reshape(len(X), *shape), [idx[grp] for grp in groups], g)
    keep = [k for k in range(len(groups)) if residuals[k] <= opts.fit_tol]
    keep = at_common_scale(keep, scales, batch_size, opts.scale_tol)
    keep = distinct(X, keep, opts.group_tol)
    if batch_size is not None:
        keep = keep[:batch_size]
    why = ("rebuilt from first-layer rows that agree on this input, its label the class whose recomputed gradient "
           "fits them; a batch's rows can agree on a blend of samples, so it is not certified")
    if batch_size is None:
        why += " (the batch size is not known: pass num_examples=1 if the client sent one sample's gradient)"
    dtype = next(model.parameters()).dtype
    samples = tuple(SampleRecovery(labels[k], False, why, witnesses=(len(groups[k]),), residual=residuals[k],
                                   scale=scales[k], route=ROUTE) for k in keep)
    missing = "" if keep else ("no two rows of the first Linear layer agree on an input that a class's gradient "
                               "fits (every unit fires for several samples, or its activation is not a ReLU)")
    return Reconstruction(
        inputs=X[keep].reshape(len(keep), *shape).to(dtype).cpu(), labels=torch.tensor([labels[k] for k in keep]),
        certified=torch.zeros(len(keep), dtype=torch.bool), attack="first-layer", samples=samples,
        batch_size=batch_size, seconds=time.perf_counter() - start, notes=notes, missing_reason=missing)


def class_fits(model: nn.Module, layer: nn.Linear, X: torch.Tensor, rows: list[torch.Tensor], g: torch.Tensor
               ) -> tuple[list[int], list[float], list[float]]:
    """Per candidate input (``X``, one per row of ``rows``): the class whose recomputed gradient at ``layer``'s
    output best fits the observed bias gradients ``g`` on its rows, that fit's relative residual and scale (inf,
    nan where no class fits at a positive scale). One forward and backward pass per class over all candidates."""
    n = len(X)
    if n == 0:
        return [], [], []
    first = next(model.parameters())
    x = X.to(first.device, first.dtype)
    best = torch.full((n,), math.inf, dtype=F64)
    label = torch.zeros(n, dtype=torch.long)
    scale = torch.full((n,), math.nan, dtype=F64)
    caught: list[torch.Tensor] = []
    hook = layer.register_forward_hook(lambda mod, args, out: caught.append(out))
    try:
        with torch.enable_grad():
            logits = model(x)
    finally:
        hook.remove()
    z = caught[0]
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
    return label.tolist(), best.tolist(), scale.tolist()


def at_common_scale(keep: list[int], scales: list[float], batch_size: int | None, tol: float) -> list[int]:
    """The candidates of ``keep`` whose fitted scale is the batch's common one (within ``tol``, relative): ``1/M``
    for the mean loss of a reported batch of ``M``, else the scale most of them share. On two classes every loss
    vector lies on one line, so a blend of samples that share their units fits a class on those rows too, but at
    a scale of its own (its loss vector is not the sum of theirs)."""
    if not keep:
        return keep
    if batch_size is not None:
        common = 1.0 / batch_size
    else:
        values = sorted(scales[k] for k in keep)
        common = max(values, key=lambda v: sum(abs(w / v - 1) <= tol for w in values))
    return [k for k in keep if abs(scales[k] / common - 1) <= tol]


def distinct(X: torch.Tensor, keep: list[int], tol: float) -> list[int]:
    """``keep`` without the candidates within ``tol`` (relative) of one kept before them (a sample whose rows fell
    into two groups)."""
    out: list[int] = []
    for k in keep:
        if all(float((X[k] - X[j]).norm()) > tol * max(float(X[j].norm()), 1e-300) for j in out):
            out.append(k)
    return out
