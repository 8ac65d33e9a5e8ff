"""The check a group of last-ReLU-layer rows passes to become a candidate: each member row must fire for the
group's implied input, carry the group's label, and have an output-layer column that is a positive multiple of
the input's loss vector (algorithms spec §2). :func:`fit_top_rows` computes what the check reads, from a
forward pass of the groups' inputs; the exact check (:func:`fedleak.attacks.exact.candidates.check_top_groups`)
and the span screen (:mod:`fedleak.attacks.exact.span_screen`) both decide from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedleak.attacks.exact.dropout import read_loss_vectors
from fedleak.nets.forward import loss_vectors

F64 = torch.float64


def end_to_end(groups: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The groups' rows laid end to end, and each row's group."""
    dev = groups[0].device
    sizes = torch.tensor([len(g) for g in groups], device=dev)
    return torch.cat(groups), torch.repeat_interleave(torch.arange(len(groups), device=dev), sizes)


def all_fire(z: torch.Tensor, rows: list[torch.Tensor]) -> torch.Tensor:
    """Whether every neuron ``rows[k]`` fires for group ``k``, from its pre-activations ``z[k]`` (one row per
    group): one gather for all groups."""
    flat, owner = end_to_end(rows)
    silent = (z[owner, flat] <= 0).long()
    return torch.zeros(len(rows), dtype=torch.long, device=z.device).index_add_(0, owner, silent) == 0


@dataclass(frozen=True)
class TopRowFit:
    """Every member row of a set of groups, laid end to end (``rows``, each one's group ``owner``): each group's
    ``label`` (its members' most frequent one, the smallest on a tie) and loss vector ``e`` (one row per group),
    whether the row carries the label (``labelled``), the row's pre-activation ``z`` for the group's input, and
    the fit of its output-layer column to the row's activation times ``e``: the least-squares ``scale``, the
    squared norm ``weight`` of what it is fitted to (which weighs the rows of one group in its scale), and the
    relative residual ``res`` (the sine of the angle between the column and ``e``; 1 where the activation is 0).
    The label entry is left out of the fit: float32 computes it as ``p_y - 1``, with cancellation. A row's label
    is its column's only negative entry; with label smoothing, :func:`smoothed_labels`. With ``train_dropout``
    ``e`` is read off the group's columns instead (:func:`~fedleak.attacks.exact.dropout.read_loss_vectors`)."""

    rows: torch.Tensor
    owner: torch.Tensor
    label: torch.Tensor
    labelled: torch.Tensor
    z: torch.Tensor
    scale: torch.Tensor
    weight: torch.Tensor
    res: torch.Tensor
    e: torch.Tensor

    def passing(self, top_tol: float) -> torch.Tensor:
        """The rows that pass the check."""
        return (self.z > 0) & self.labelled & (self.scale > 0) & (self.res <= top_tol)

    def group_scales(self, rows: torch.Tensor) -> torch.Tensor:
        """Each group's scale fitted over its rows selected by the mask ``rows`` (least squares: the rows' scales
        weighted by ``weight``; NaN for a group with none)."""
        n = len(self.label)
        w = torch.where(rows, self.weight, torch.zeros_like(self.weight))
        num = torch.zeros(n, dtype=w.dtype, device=w.device).index_add_(0, self.owner, w * self.scale)
        den = torch.zeros(n, dtype=w.dtype, device=w.device).index_add_(0, self.owner, w)
        return torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(den, float("nan")))


def fit_top_rows(attack, members: list[torch.Tensor], z: torch.Tensor, logits: torch.Tensor) -> TopRowFit:
    """:class:`TopRowFit` of groups with member rows ``members`` and their inputs' forward pass (pre-activations
    ``z``, ``logits``; one row per group)."""
    dev = z.device
    rows, owner = end_to_end(members)
    columns = attack.G[-1][:, rows].T.to(F64)  # members x K
    K = columns.shape[1]
    smoothing = attack.opts.smoothing
    masked = attack.opts.train_dropout  # the loss vectors are read off the columns (:mod:`...exact.dropout`)
    if smoothing and not masked:
        labels = smoothed_labels(columns, torch.softmax(logits, 1)[owner] - smoothing / K)
    else:
        labels = columns.argmin(1)
    votes = torch.zeros(len(members), K, dtype=torch.long, device=dev).index_put_(
        (owner, labels), torch.ones_like(labels), accumulate=True)
    label = votes.argmax(1)
    if masked:
        e = read_loss_vectors(columns, torch.relu(z[owner, rows]), owner, len(members))
    else:
        e = loss_vectors(logits, label, smoothing, attack.opts.focal_gamma)
    others = (torch.arange(K, device=dev)[None, :] != label[owner][:, None]).to(columns.dtype)
    pred = torch.relu(z[owner, rows])[:, None] * e[owner] * others
    cols = columns * others
    weight = (pred * pred).sum(1)
    scale = (pred * cols).sum(1) / weight.clamp_min(1e-300)
    res = (cols - scale[:, None] * pred).norm(dim=1) / cols.norm(dim=1).clamp_min(1e-300)
    return TopRowFit(rows, owner, label, labels == label[owner], z[owner, rows], scale, weight, res, e)


def smoothed_labels(columns: torch.Tensor, off_label: torch.Tensor) -> torch.Tensor:
    """Each row's label under label smoothing ``s``: off its label, a sample's loss vector is ``p - s/K``
    (``off_label``, one row per column), so its output-layer column is a positive multiple of ``off_label`` on
    every entry but the label's. The label is the entry whose omission leaves the best such fit (least relative
    residual); its column's most negative entry is not (a confident sample's label entry ``p_y - 1 + s - s/K``
    may be above the others' ``p_c - s/K``)."""
    c, v = columns, off_label
    cc, cv, vv = (c * c).sum(1, keepdim=True), (c * v).sum(1, keepdim=True), (v * v).sum(1, keepdim=True)
    num, den, rest = cv - c * v, vv - v * v, cc - c * c  # each entry omitted in turn
    res = (rest - num.square() / den.clamp_min(1e-300)) / rest.clamp_min(1e-300)
    res = torch.where((num > 0) & (den > 0), res, torch.full_like(res, float("inf")))
    return res.argmin(1)
