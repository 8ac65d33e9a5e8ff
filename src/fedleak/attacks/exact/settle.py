"""Candidates the certificate cannot take, settled before it from what the top layer's check read.

On two-class data every blend of samples whose rows are shared by the same samples passes the top layer's check,
so the attack reads hundreds of candidates for a batch of 16, most with a single witness row. The certificate
fits each one's witnesses, replays it in float32 and weighs it against the others, yet a certified sample can
only sit at the batch's common scale, and a blend's scale is a ratio of its constituents' loss magnitudes. Each
candidate's scale is already known from the check (:class:`~fedleak.attacks.exact.top_check.TopRowFit`), and so
are the scales the batch can take, so the candidates far from all of them are settled here, with their reason,
and the certificate sees only the others.
"""

from __future__ import annotations

import numpy as np

from fedleak.attacks.exact.options import NO_SIZE_FROM_SUM

SETTLE = 0.01  # a candidate's scale this far (relative) from every scale the batch's samples can share settles it
PAIR_TOL = 1e-3  # two candidates' scales, as the top layer's check reads them, that may agree in the certificate


def settled_by_scale(attack, complete: list, reported: int | None) -> dict[int, str]:
    """The candidates no certificate can take, told from what the top layer's check read, with the reason
    for each (by index).

    Every certified sample sits at the batch's common scale (:func:`~fedleak.attacks.exact.certificate.
    batch_scale`): ``1/M`` (1 for a summed loss) when the batch size ``M`` is reported; else ``1/M`` with
    ``M`` whole that two candidates with the witnesses a certificate needs share (or 1, for a lone sample); for
    a weight delta, the scale of one of those candidates. The check's scale of a candidate (the least-squares
    fit of its witness rows' output-layer columns) agrees with the certificate's fit to within 1e-4 on the
    candidates near the batch's scale, so a candidate more than ``SETTLE`` (or 100 ``scale_tol``) away from
    every scale the batch can take is settled (on two-class data, most of the hundreds of blends of samples),
    and the certificate sees only the others. Under per-sample clipping or class weights each sample has a
    scale of its own, and nothing is settled."""
    opts = attack.opts
    if opts.clip_norm is not None or opts.class_weights is not None or not complete:
        return {}
    t = attack.net.depth - 1
    tops = np.array([min(len(c.witnesses.get(t, ())), opts.max_witnesses) for c in complete])
    scales = np.array([c.scale for c in complete], dtype=float)
    read = np.isfinite(scales) & (scales > 0)  # the check's scale, where it read one
    able = np.sort(scales[read & (tops >= opts.min_last)])
    if opts.known_scale and reported is not None:
        shared = np.array([opts.common_scale(reported)])
        what = f"the batch's common scale {opts.reduction.written(reported)}"
    elif opts.known_scale and not opts.reduction.reveals_batch_size:  # the batch size is needed, and unknown
        shared, what = np.array([]), ""
    elif opts.known_scale:  # 1/M with M whole, from two samples that agree on it, or a lone one at scale 1
        pair = np.zeros(len(able), dtype=bool)
        close = able[1:] / able[:-1] - 1 <= PAIR_TOL
        pair[1:] |= close
        pair[:-1] |= close
        whole = np.abs(1 / able - np.round(1 / able)) <= PAIR_TOL / able
        shared = able[whole & (pair | (np.abs(able - 1) <= PAIR_TOL))]
        what = "the nearest scale the batch's samples can share"
    else:
        shared, what = able, "the nearest scale the batch's samples can share"
    if not opts.known_scale:
        unknown = "no candidate has the witnesses a certificate needs, which would fix the batch's common scale"
    elif opts.reduction.reveals_batch_size:
        unknown = ("no batch size was reported, and no two candidates with the witnesses a certificate needs share "
                   "a scale 1/M with M whole (nor is a lone one at scale 1)")
    else:
        unknown = NO_SIZE_FROM_SUM
    tol = max(SETTLE, 100 * opts.scale_tol)
    ks = np.flatnonzero(read)
    ratios = np.full(len(ks), np.inf)  # each candidate's scale over the nearest shared one (none: infinitely far)
    if len(shared):  # the nearest shared scale: the one just below the candidate's or the one at or above it
        at = np.searchsorted(shared, scales[ks])
        below, above = shared[np.maximum(at - 1, 0)], shared[np.minimum(at, len(shared) - 1)]
        ratios = scales[ks] / np.where(np.abs(scales[ks] / below - 1) <= np.abs(scales[ks] / above - 1), below, above)
    far = np.abs(ratios - 1) > tol
    ks, ratios = ks[far], ratios[far]
    settled = {}
    for j, k in enumerate(ks.tolist()):
        why = (f"its scale, read from its witness rows' output-layer columns, is {ratios[j]:.3g} times {what} "
               "(a blend of samples, not a sample)" if len(shared) else unknown)
        if tops[k] < opts.min_last:
            why = (f"only {tops[k]} exclusive neuron(s) at the last ReLU layer (a certificate needs "
                   f"{opts.min_last}), and {why}")
        settled[k] = why
    return settled
