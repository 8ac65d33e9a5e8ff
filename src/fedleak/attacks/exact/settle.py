"""Candidates the certificate cannot take, settled before it from what the top layer's check read.

On two-class data every blend of samples whose rows are shared by the same samples passes the top layer's check,
so the attack reads hundreds of candidates for a batch of 16, most with a single witness row. The certificate
fits each one's witnesses, replays it in float32 and weighs it against the others; a candidate with fewer
witness rows than a certificate needs can only join the certified set as part of the whole batch, and only at
the batch's common scale. Its scale is already known from the check (:class:`~fedleak.attacks.exact.top_check.
TopRowFit`), so the ones far from every scale the batch can take are settled here, with their reason, and the
certificate sees only the others.
"""

from __future__ import annotations

import numpy as np

SETTLE = 0.01  # a candidate's scale this far (relative) from every scale the batch's samples can share settles it
PAIR_TOL = 1e-3  # two candidates' scales, as the top layer's check reads them, that may agree in the certificate


def settled_by_scale(attack, complete: list, reported: int | None) -> dict[int, str]:
    """The candidates no certificate can take, told from what the top layer's check read, with the reason
    for each (by index).

    A candidate with fewer witness rows at the last ReLU layer than a certificate needs joins a certified set
    only as part of the whole batch, and only at the batch's common scale (:func:`~fedleak.attacks.exact.certificate.batch_scale`): ``1/M`` when
    the batch size ``M`` of a mean-loss gradient is reported; else the scale two candidates that have the
    witnesses share (or 1, for a lone sample); for a weight delta, the scale of one of them. The check's scale
    of a candidate (its witness rows' output-layer columns) agrees with the certificate's fit to within 1e-4
    on the candidates near the batch's scale, so one more than ``SETTLE`` (or 100 ``scale_tol``) away from every
    scale the batch can take is settled (on two-class data, most of the hundreds of blends of samples), and the
    certificate sees only the others. Under per-sample clipping each sample has a scale of its own, and
    nothing is settled."""
    opts = attack.opts
    if opts.clip_norm is not None or not complete:
        return {}
    t = attack.net.depth - 1
    tops = [min(len(c.witnesses.get(t, ())), opts.max_witnesses) for c in complete]
    scales = np.array([c.scale for c in complete], dtype=float)
    read = np.isfinite(scales) & (scales > 0)  # the check's scale, where it read one
    few = [k for k, n in enumerate(tops) if n < opts.min_last and read[k]]
    if not few:
        return {}
    able = np.sort(scales[read & (np.array(tops) >= opts.min_last)])
    if opts.known_scale and reported is not None:
        shared, what = np.array([1.0 / reported]), f"the batch's common scale 1/{reported}"
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
    need = f"a certificate needs {opts.min_last}"
    if len(shared) == 0:
        return {k: f"only {tops[k]} exclusive neuron(s) at the last ReLU layer ({need}), and no candidates with "
                   "the witnesses fix the batch's common scale" for k in few}
    tol = max(SETTLE, 100 * opts.scale_tol)
    settled = {}
    for k in few:
        s = float(scales[k])
        at = int(np.searchsorted(shared, s))  # the nearest shared scales are just below and at ``at``
        near = min(shared[max(at - 1, 0) : at + 1].tolist(), key=lambda v: abs(s / v - 1))
        if abs(s / near - 1) > tol:
            settled[k] = (f"only {tops[k]} exclusive neuron(s) at the last ReLU layer ({need}), and its scale, read "
                          f"from their output-layer columns, is {s / near:.3g} times {what} (a blend of samples, "
                          "not a sample)")
    return settled
