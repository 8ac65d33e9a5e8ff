"""What a malicious-server candidate needs beyond its own fit to be certified (see :mod:`fedleak.attacks.malicious`).

A candidate's own check recomputes its gradient and asks it to explain the rows it was read from at the batch's
scale. Where the rows carry more than that one number (trap weights on a model with three or more classes, or a
second hidden layer: the next layer's gradient columns), a blend of samples fails it. Where they carry only the
scale, a blend passes whenever its scale happens to match, and a batch offers hundreds of blends: an imprint bin
difference is one bias entry, and on a two-class model with one hidden layer a trap row's next-layer columns follow
from its bias entry and the rebuilt input (the loss vector is one number times ``(1, -1)``). There the candidates are
certified only with a proof that covers the whole batch:

* **Counting** (imprint): every bin difference that is non-zero beyond its rounding holds at least one sample. With
  ``M`` samples in ``N`` such bins, at most ``E = M - N`` bins hold several. A candidate refuted as one sample
  (whatever its rounding: a neuron provably shut, or no label puts its scale within ten scale tolerances of the
  batch's) is such a bin; when exactly ``E`` are refuted they are all of them, and every other bin holds one
  sample. That needs the batch's scale right: more than ``E`` candidates must sit at it (within the scale
  tolerance, rebuilt to within the exactness tolerance). Were it wrong, each would be a blend (at most ``E`` bins
  hold one) or a sample whose scale at a label not its own matches by chance; that second case is the one thing
  the count assumes away. (Explaining every row proves nothing here: a blend whose scale matches explains its bin
  exactly as its samples do.)
* **The whole batch** (trap weights): at most ``M`` distinct samples whose recomputed gradients add up to every row
  of the update's first layer (a sample that opens no neuron adds nothing to it): the candidates consistent at the
  batch's scale, and the samples peeled off the rows they share with them (:mod:`fedleak.attacks.malicious.peel`).
  Only the candidates read alone are certified (a peeled input carries the rounding of every sample subtracted
  before it). A blend cannot stand in for its samples here: it opens other rows than they do, and on each row
  that one of them opens alone it adds another vector. Certified candidates must also not **share a row**: of two
  candidates consistent at the batch's scale, one may not open a neuron the other claims alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedleak.attacks.malicious.peel import FirstLayer, contributions, peel
from fedleak.nets import ReluMLP, Trace


@dataclass(frozen=True)
class Proof:
    """Whether a proof that covers the whole batch holds, and what it found, or why it fails."""

    holds: bool
    why: str


@dataclass(frozen=True)
class BinCount:
    """Imprint bins: the bin differences that are non-zero beyond their rounding (each holds at least one sample),
    how many of those gave no candidate (their bias entries cancel: several samples), and for each candidate whether
    its bin is one of them (a candidate read from rounding alone is refuted, but holds no sample to count)."""

    nonempty: int
    strays: int
    filled: tuple[bool, ...]


def copies(X: torch.Tensor, tol: float) -> torch.Tensor:
    """``[i, j]``: inputs ``i`` and ``j`` are copies of one sample (within ``tol`` of the smaller one's norm)."""
    norms = X.norm(dim=1).clamp_min(1e-300)
    return torch.cdist(X, X) <= tol * torch.minimum(norms[:, None], norms[None, :])


def shared_rows(pre: torch.Tensor, row_l1: torch.Tensor, X: torch.Tensor, rows: list[list[int]],
                bound: torch.Tensor | None, consistent: np.ndarray, merge_tol: float) -> dict[int, int]:
    """Candidates that refute each other, each with a neuron where they do: of two candidates consistent at the
    batch's scale, one opens (beyond its rounding) a neuron the other claims alone. A row claimed alone holds one
    sample's gradient, and a sample that opens it would add its own, so at most one of the two is a sample and
    neither is certified. Copies of one sample (within ``merge_tol``) do not count."""
    idx = np.nonzero(consistent)[0]
    if len(idx) < 2:
        return {}
    sel = torch.as_tensor(idx, device=pre.device)
    margin = bound[sel, None] * row_l1[None, :] if bound is not None else 0.0  # the sign may be rounding's
    opens = (pre[sel] > margin).cpu().numpy()
    owner = np.full(pre.shape[1], -1)
    for j, k in enumerate(idx):
        owner[rows[k]] = j
    same = copies(X[sel], merge_tol).cpu().numpy()
    out: dict[int, int] = {}
    for a in range(len(idx)):
        for r in np.nonzero(opens[a] & (owner >= 0))[0]:
            b = int(owner[r])
            if b != a and not same[a, b]:
                out.setdefault(int(idx[a]), int(r))
                out.setdefault(int(idx[b]), int(r))
    return out


def refuted_as_one(net: ReluMLP, trace: Trace, row_l1: torch.Tensor, owner: torch.Tensor, idx: torch.Tensor,
                   silent: list[list[int]], obs: list[torch.Tensor], bound: torch.Tensor, batch_scale: float,
                   slack: float) -> np.ndarray:
    """Candidates that are surely not one sample, whatever their rounding (``bound``: the max abs error of each
    rebuilt input; ``trace``: their forward pass; ``owner``, ``idx``: each claimed row's candidate and neuron;
    ``row_l1``: the first layer's row norms): a neuron they claim stays shut (or one that must stay shut opens)
    beyond it, or, on a head with one hidden layer, no label puts the batch's scale within ``slack`` (relative) of
    the interval of scales the rows allow. Were the candidate one sample ``x`` (within ``bound`` of it), ``x`` opens
    its rows, so each row's bias entry is the scale times ``W2[:, r] . e_y(x)``; ReLU is 1-Lipschitz and softmax
    1/2-Lipschitz in the max norm, so ``e_y`` moves by at most half the logits' bound,
    ``max_c sum_j |W2[c, j]| |W1[j]|_1 bound``."""
    n = len(silent)
    z = trace.preactivations[0]
    margin = bound[:, None] * row_l1[None, :]
    shut = torch.zeros(n, dtype=torch.bool, device=z.device)
    if len(owner):
        shut.index_put_((owner,), z[owner, idx] < -margin[owner, idx], accumulate=True)
    s_owner = torch.tensor([k for k, r in enumerate(silent) for _ in r], dtype=torch.long, device=z.device)
    s_idx = torch.tensor([i for r in silent for i in r], dtype=torch.long, device=z.device)
    if len(s_owner):
        shut.index_put_((s_owner,), z[s_owner, s_idx] > margin[s_owner, s_idx], accumulate=True)
    shut = shut.cpu().numpy()
    if net.depth != 1 or n == 0:
        return shut
    W2 = net.weights()[1]
    lip = 0.5 * float((W2.abs() @ row_l1).max())
    o = torch.cat(obs)
    wide = W2[:, idx].abs().sum(0) * lip * bound[owner]
    rel = (bound / trace.activations[0].abs().amax(1).clamp_min(1e-300))[owner]  # bounds the entries' own rounding
    p = torch.softmax(trace.logits, 1)
    near = torch.zeros(n, dtype=torch.bool, device=z.device)
    for y in range(net.num_classes):
        e = p.clone()
        e[:, y] -= 1
        d = (e[owner] * W2[:, idx].T).sum(1)  # each row's bias entry per unit scale, ungated
        lo, hi = d - wide, d + wide
        ends = torch.stack([o / lo, o / hi])
        s_lo = torch.full((n,), -torch.inf, dtype=o.dtype, device=o.device).scatter_reduce_(
            0, owner, ends.amin(0) * (1 - rel), "amax")
        s_hi = torch.full((n,), torch.inf, dtype=o.dtype, device=o.device).scatter_reduce_(
            0, owner, ends.amax(0) * (1 + rel), "amin")
        zero = torch.zeros(n, dtype=torch.bool, device=o.device).index_put_(
            (owner,), (lo <= 0) & (hi >= 0), accumulate=True)  # a row's entry may be 0: no scale follows
        near |= zero | ((s_lo * (1 - slack) <= batch_scale) & (batch_scale <= s_hi * (1 + slack)))
    return shut | (~near).cpu().numpy()


def counting_proof(refuted: np.ndarray, standing: np.ndarray, bins: BinCount, n_examples: int | None) -> Proof:
    """Whether every candidate not ``refuted`` is proven one sample by counting the bins (module docstring);
    ``standing``: the candidates that passed their own checks at the batch's scale."""
    if not n_examples:
        return Proof(False, "the update reports no number of examples, so its bins cannot be counted")
    extra = n_examples - bins.nonempty
    filled = np.array(bins.filled, dtype=bool)
    failed = int((refuted & filled).sum()) + bins.strays
    if extra < 0:
        return Proof(False, f"{bins.nonempty} bins hold a sample, more than the {n_examples} examples the update "
                     f"reports")
    pinning = int((standing & filled).sum())
    if pinning <= extra:
        return Proof(False, f"{n_examples} samples fill {bins.nonempty} bins, and only {pinning} candidate(s) sit at "
                     f"the batch's scale, not more than the {extra} bin(s) that may hold several: the scale may be a "
                     f"blend's")
    if failed != extra:
        return Proof(False, f"{n_examples} samples fill {bins.nonempty} bins, so {extra} bin(s) hold several, and "
                     f"{failed} are refuted as one sample: a blend among the rest may match the batch's scale by "
                     f"chance")
    return Proof(True, f"counting proves it alone in its bin ({n_examples} samples fill {bins.nonempty} bins, and "
                 f"all {extra} that hold several are refuted as one sample)")


def whole_batch_proof(net: ReluMLP, X: torch.Tensor, labels: list[int], chosen: list[int], scale: float,
                      layer: FirstLayer, n_examples: int | None, group_tol: float, fit_tol: float,
                      focal_gamma: float = 0.0) -> Proof:
    """Whether the ``chosen`` candidates, with the samples peeled off the rows they share with others
    (:func:`~fedleak.attacks.malicious.peel.peel`), are at most ``n_examples`` samples whose recomputed first-layer
    gradients at ``scale`` add up to every row of the update's first layer (within ``fit_tol`` of each row, beyond
    its rounding). Fewer than ``n_examples`` may do: a sample that opens no neuron of the first layer
    adds nothing to it. ``focal_gamma``: the client's focal loss, which the recomputed gradients take."""
    limit = n_examples or layer.g.shape[0]
    if len(chosen) > limit:
        return Proof(False, f"{len(chosen)} candidates are consistent at the batch's scale, more than the "
                     f"{n_examples} examples the update reports")
    sel = torch.as_tensor(chosen, dtype=torch.long, device=X.device)
    whole, whole_labels = peel(net, layer, X[sel], [labels[k] for k in chosen], scale, limit, group_tol, fit_tol,
                               focal_gamma)
    G_hat, g_hat = contributions(net, whole, whole_labels, scale, focal_gamma)
    obs, fit = torch.cat([layer.G, layer.g[:, None]], 1), torch.cat([G_hat, g_hat[:, None]], 1)
    gap = (obs - fit).norm(dim=1)
    off = gap > fit_tol * torch.maximum(obs.norm(dim=1), fit.norm(dim=1)) + 4 * layer.noise * obs.shape[1] ** 0.5
    peeled = len(whole_labels) - len(chosen)
    by = f" and {peeled} more read by subtracting them from the rows they share" if peeled else ""
    if bool(off.any()):
        return Proof(False, f"the {len(chosen)} candidate(s) consistent at the batch's scale{by} do not add up to "
                     f"the update's first layer ({int(off.sum())} of its {len(off)} rows differ)")
    return Proof(True, f"the {len(chosen)} candidate(s) consistent at the batch's scale{by} add up to every row of "
                 f"the update's first layer")
