"""Image-reconstruction metrics (algorithms spec §7) and order-free matching to the originals.

Nothing is clamped: every metric scores the values as they are, on the data's own value range
``(lo, hi)`` (:func:`match` takes it from an option, the originals' :class:`~fedleak.data.Dataset`, or
the originals' min and max; never an assumed [0, 1]). Per image: MSE, PSNR with data range ``hi - lo``
(capped at :data:`PSNR_CAP` dB), SSIM with the standard 11x11 Gaussian window (sigma 1.5; the window is
cut to the image for images under 11 pixels) and the same data range, the maximum absolute error, and
label accuracy (the per-image scores: :mod:`fedleak.image_metrics`). A reconstruction is *exact* when its max abs
error is at most ``EXACT_TOL * (hi - lo)``.

Attacks return unordered batches, so :func:`match` pairs reconstructions with originals by a Hungarian
assignment, and, because a certificate claims "this is a sample of the batch", it also checks every
certified reconstruction on its own: one that is not exact to an original with its label, or that is a
second certified copy of an original another certified reconstruction already claims, is a *false
certificate*, whether or not the one-per-original assignment paired it with anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from fedleak.client_loss import hard_labels
from fedleak.errors import FedleakError
from fedleak.image_metrics import PSNR_CAP, as_images, mse, psnr, ssim  # noqa: F401  (PSNR_CAP: public here too)
from fedleak.reconstruction import Reconstruction
from fedleak.validation import all_finite, check_data_range

if TYPE_CHECKING:
    from fedleak.data.dataset import Dataset
    from fedleak.data.normalize import Normalization

EXACT_TOL = 1e-4  # max abs error, as a fraction of the data range (hi - lo), up to which a sample is exact
NEAR_DB = 40.0  # a reconstruction within this PSNR of an original is a near copy of it ...
NEAR_MSE = 10 ** (-NEAR_DB / 10)  # ... its MSE at most this times the data range squared


@dataclass(frozen=True)
class MatchResult:
    """How a reconstruction scores against the originals.

    Per original (arrays of length N, the batch size): ``matched`` is the reconstruction paired with it
    (``-1``: none), then that pair's ``mse``, ``psnr``, ``ssim``, ``max_abs_error``, ``label_correct``
    and whether the paired reconstruction is ``certified``; ``allowed_error`` is the max abs error its
    certificate claims (the exactness tolerance, or the larger bound a CNN certificate proves and states).
    ``recovered`` is certified, within that claim and with the right label; ``exact`` is within the
    exactness tolerance, certified or not.

    Per certified reconstruction (arrays of length :attr:`n_certified`, in the reconstruction's order):
    ``certified_index`` is its index in the reconstruction, ``certified_nearest`` the original nearest
    to it by max abs error and ``certified_error`` that error, ``certified_original`` the original it is
    credited with (``-1``: none), ``certified_false`` whether it is a false certificate and
    ``certified_reason`` why ('' when it is sound). Each certified reconstruction is credited with at
    most one original and each original with at most one certified reconstruction (a maximum matching
    on "within its claim with the right label"), so ``recovered.sum() + false_certificates == n_certified``.

    ``false_certificates`` counts every false certificate once: certified reconstructions that match no
    original within their claim, carry a wrong label, or duplicate an original already claimed (including
    those beyond the batch size that the one-per-original pairing leaves unmatched). It must be 0.
    ``data_range`` is the (lo, hi) the scores were computed on; ``exact_tol`` the absolute tolerance.
    """

    matched: np.ndarray
    mse: np.ndarray
    psnr: np.ndarray
    ssim: np.ndarray
    max_abs_error: np.ndarray
    label_correct: np.ndarray
    certified: np.ndarray
    label_accuracy: float
    allowed_error: np.ndarray
    data_range: tuple[float, float] = (0.0, 1.0)
    exact_tol: float = EXACT_TOL
    n_certified: int = 0
    false_certificates: int = 0
    certified_index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    certified_nearest: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    certified_error: np.ndarray = field(default_factory=lambda: np.zeros(0))
    certified_original: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    certified_false: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    certified_reason: tuple[str, ...] = ()

    @property
    def exact(self) -> np.ndarray:
        """Per original: paired with a reconstruction whose max abs error is at most :attr:`exact_tol`."""
        return (self.matched >= 0) & (self.max_abs_error <= self.exact_tol)

    @property
    def recovered(self) -> np.ndarray:
        """Per original: paired with a certified reconstruction with the right label whose error is within its
        certificate's claim (:attr:`allowed_error`: exactness, or the error bound the certificate states)."""
        return ((self.matched >= 0) & (self.max_abs_error <= self.allowed_error) & self.certified
                & self.label_correct)

    @property
    def false_certificate(self) -> np.ndarray:
        """Per certified reconstruction (same as :attr:`certified_false`): ``.sum()`` is
        :attr:`false_certificates`, ``.any()`` says whether there is one."""
        return self.certified_false

    @property
    def recovered_fraction(self) -> float:
        return float(self.recovered.mean())

    def mean_psnr(self) -> float:
        """Mean PSNR over matched originals (nan when nothing matched)."""
        sel = self.matched >= 0
        return float(self.psnr[sel].mean()) if sel.any() else float("nan")

    def per_original(self) -> dict[str, list]:
        """The per-original scores as JSON-ready lists (one entry per original)."""
        return {
            "matched": self.matched.tolist(),
            "mse": self.mse.tolist(),
            "psnr": self.psnr.tolist(),
            "ssim": self.ssim.tolist(),
            "max_abs_error": self.max_abs_error.tolist(),
            "label_correct": self.label_correct.tolist(),
            "certified": self.certified.tolist(),
            "exact": self.exact.tolist(),
            "recovered": self.recovered.tolist(),
        }

    def per_certified(self) -> dict[str, list]:
        """The per-certified-reconstruction checks as JSON-ready lists (one entry per certified sample)."""
        return {
            "certified_index": self.certified_index.tolist(),
            "certified_nearest": self.certified_nearest.tolist(),
            "certified_error": self.certified_error.tolist(),
            "certified_original": self.certified_original.tolist(),
            "certified_false": self.certified_false.tolist(),
            "certified_reason": list(self.certified_reason),
        }

    def false_reasons(self) -> list[tuple[int, str]]:
        """``(reconstruction index, reason)`` of every false certificate."""
        return [(int(j), r) for j, f, r in zip(self.certified_index, self.certified_false, self.certified_reason) if f]

    def to_dict(self) -> dict[str, object]:
        return {
            **self.per_original(),
            **self.per_certified(),
            "label_accuracy": self.label_accuracy,
            "recovered_fraction": self.recovered_fraction,
            "n_certified": self.n_certified,
            "false_certificates": self.false_certificates,
            "data_range": list(self.data_range),
            "exact_tol": self.exact_tol,
        }


def _multiset_accuracy(pred: np.ndarray, true: np.ndarray) -> float:
    if len(true) == 0:
        return float("nan")
    k = int(max(pred.max(initial=0), true.max(initial=0))) + 1
    return float(np.minimum(np.bincount(pred, minlength=k), np.bincount(true, minlength=k)).sum() / len(true))


def resolve_data_range(originals: torch.Tensor, data_range: tuple[float, float] | None = None) -> tuple[float, float]:
    """The (lo, hi) value range metrics use: ``data_range`` if given (checked: finite, lo < hi), else the
    originals' min and max. A constant batch (min = max) gets the width ``max(|lo|, |hi|)`` (1 if that is
    0), so that tolerances stay positive."""
    if data_range is not None:
        return check_data_range(data_range)
    x = torch.as_tensor(originals)
    if x.numel() == 0:
        raise FedleakError("no originals to take the data range from")
    lo, hi = float(x.min()), float(x.max())
    if not hi > lo:
        hi = lo + (max(abs(lo), abs(hi)) or 1.0)
    return lo, hi


def _finite_costs(cost: np.ndarray) -> np.ndarray:
    """NaN / inf (a reconstruction with non-finite values) become a cost above every finite one."""
    bad = ~np.isfinite(cost)
    if bad.any():
        finite = cost[~bad]
        cost = cost.copy()
        cost[bad] = 2 * (float(finite.max()) if finite.size else 1.0) + 1
    return cost


def _integer_dtype(values: object) -> str | None:
    """The name of ``values``' integer or boolean dtype (a tensor or numpy array), else None."""
    if isinstance(values, torch.Tensor):
        return None if values.is_floating_point() or values.is_complex() else str(values.dtype).removeprefix("torch.")
    if isinstance(values, np.ndarray) and values.dtype.kind in "biu":
        return values.dtype.name
    return None


def match(
    reconstructed: Reconstruction | torch.Tensor,
    originals: torch.Tensor | Dataset,
    labels: torch.Tensor | None = None,
    *,
    data_range: tuple[float, float] | None = None,
    normalization: Normalization | None = None,
) -> MatchResult:
    """Score a reconstruction against the originals: every original, and every certified reconstruction.

    ``reconstructed`` is a :class:`Reconstruction` (its labels and certificates are used) or a tensor of
    images. ``originals`` is a tensor of images or a :class:`~fedleak.data.Dataset` (its ``x``, and its
    ``y`` when ``labels`` is not given). ``data_range`` is the data's (lo, hi) value range; when it is
    ``None`` it is the originals' ``Dataset.value_range`` if ``originals`` is a Dataset, else the
    originals' min and max (so pass the data set's range when scoring a small batch whose pixels may not
    span it). ``labels`` are class indices, or soft labels (an N x K tensor, what MixUp trains on), scored as
    their most probable class. Neither side is clamped. Exact means max abs error ``<= EXACT_TOL * (hi - lo)``; PSNR and
    SSIM use the data range ``hi - lo``.

    ``normalization`` (or the Dataset's): the data is mean/std-normalised as the model expects; both sides
    are then mapped back to pixels (:meth:`~fedleak.data.Normalization.invert`, unclamped) and scored on the
    pixel range, as image-reconstruction papers report PSNR.

    Pairing (one reconstruction per original): certified reconstructions first, by a Hungarian
    assignment that maximises the number of (exact, right label) pairs and then minimises MSE, so that
    neither an uncertified candidate nor a wrong certified one can push a sound certified sample off its
    original; then the uncertified ones to the originals left, by an assignment that maximises the number of near
    copies (PSNR at least :data:`NEAR_DB`) and then minimises MSE (the least total MSE alone gave up near copies for
    a smaller sum over poor pairs). Samples the attack found but could
    not rebuild (``SampleRecovery.rebuilt`` False: their rows hold zeros) are never paired. Unmatched originals
    (the attack found fewer samples) get NaN scores and ``matched = -1``.

    Certificates: each certified reconstruction is credited with the original it is paired with when it
    is exact to it with the right label; every other certified reconstruction (more certified than
    originals, a blend, a wrong label, a second copy of an original) is a false certificate, counted in
    ``false_certificates`` with its reason in ``certified_reason``.

    Label accuracy is the order-free multiset overlap of rebuilt and true labels, over all originals.
    """
    from fedleak.data.dataset import Dataset

    if isinstance(originals, Dataset):
        if labels is None:
            labels = originals.y
        if normalization is None:
            normalization = originals.normalization
        if data_range is None and normalization is None:
            data_range = originals.value_range
        originals = originals.x
    if isinstance(reconstructed, Reconstruction):
        rec_x, rec_y, cert = reconstructed.inputs, reconstructed.labels, reconstructed.certified
        claims = reconstructed.error_bounds
        # a sample the attack found (label, reason) but could not rebuild holds zeros: never paired with anything
        built = np.array([s.rebuilt for s in reconstructed.samples], dtype=bool) \
            if len(reconstructed.samples) == len(reconstructed) else np.ones(len(reconstructed), dtype=bool)
    else:
        rec_x, rec_y, cert = torch.as_tensor(reconstructed), None, None
        claims = np.full(int(rec_x.shape[0]), np.nan)
        built = np.ones(int(rec_x.shape[0]), dtype=bool)
    integers = _integer_dtype(originals)
    if integers:  # a reconstruction is never integer: the originals are not what the model read
        raise FedleakError(f"the originals are {integers} values: pass them as the model saw them, as floats "
                           "(x.float() / 255 for 8-bit images the model reads in [0, 1], x.float() for a model that "
                           "reads 0..255)")
    orig = as_images(originals)
    if orig.shape[0] == 0:
        raise FedleakError("no originals to match against")
    if not all_finite(orig):
        raise FedleakError("the originals hold NaN or inf values")
    n_rec = int(rec_x.shape[0])
    if n_rec and rec_x[0].numel() != orig[0].numel():
        raise FedleakError(
            f"reconstructions have {rec_x[0].numel()} values per sample but originals have {orig[0].numel()}"
        )
    if normalization is not None:  # a claim in input units is at most max(std) times that in pixels
        claims = claims * max(normalization.std)
    if normalization is not None:
        if data_range is not None and tuple(data_range) != normalization.pixel_range:
            raise FedleakError("pass either data_range or normalization: normalised data is scored on its pixel range")
        orig = normalization.invert(orig)
        rec_x = normalization.invert(as_images(rec_x, orig)) if int(rec_x.shape[0]) else rec_x
        data_range = normalization.pixel_range
    lo, hi = resolve_data_range(orig, data_range)
    width = hi - lo
    tol = EXACT_TOL * width
    n_orig = orig.shape[0]
    rec = as_images(rec_x, orig) if n_rec else orig[:0]
    if labels is not None:  # soft labels (MixUp): scored as their top class
        labels = hard_labels(torch.as_tensor(labels))
    true_y = torch.as_tensor(labels).numpy().astype(np.int64) if labels is not None else None
    pred_y = rec_y.numpy().astype(np.int64) if rec_y is not None else None
    if true_y is not None and len(true_y) != n_orig:
        raise FedleakError(f"{len(true_y)} labels for {n_orig} originals")
    cert_mask = cert.numpy().astype(bool) if cert is not None else np.zeros(n_rec, dtype=bool)
    cert_idx = np.nonzero(cert_mask)[0]
    n_cert = len(cert_idx)

    flat_o = orig.reshape(n_orig, -1)
    flat_r = rec.reshape(n_rec, flat_o.shape[1])
    # max abs error of every certified reconstruction against every original (one row at a time: no
    # n_cert x n_orig x D tensor)
    err_c = np.empty((n_cert, n_orig))
    for k, j in enumerate(cert_idx):
        e = (flat_o - flat_r[j]).abs().amax(1).numpy()
        err_c[k] = np.where(np.isnan(e), np.inf, e)
    # each certificate is held to its claim: exactness, or the error bound it states (never below exactness)
    allowed_c = np.fmax(tol, claims[cert_idx]) if n_cert else np.zeros(0)
    close_c = err_c <= allowed_c[:, None]  # n_cert x n_orig
    if pred_y is not None and true_y is not None:
        label_c = pred_y[cert_idx][:, None] == true_y[None, :]
    else:
        label_c = np.ones((n_cert, n_orig), dtype=bool)
    valid_c = close_c & label_c

    matched = np.full(n_orig, -1)
    credited = np.full(n_cert, -1)  # original each certified reconstruction is credited with
    out_mse = np.full(n_orig, np.nan)
    out_psnr = np.full(n_orig, np.nan)
    out_ssim = np.full(n_orig, np.nan)
    out_max = np.full(n_orig, np.inf)
    out_allowed = np.full(n_orig, tol)
    label_ok = np.zeros(n_orig, dtype=bool)
    certified = np.zeros(n_orig, dtype=bool)
    rows = np.zeros(0, dtype=np.int64)  # the originals paired with a reconstruction
    if n_rec:
        cost = _finite_costs(torch.cdist(flat_o, flat_r).pow(2).numpy() / flat_o.shape[1])
        if n_cert:
            # certified reconstructions claim to be samples of the batch: they are paired first, and a pair
            # that is exact with the right label beats any that is not (the penalty exceeds any MSE sum)
            sub = cost[:, cert_idx]
            penalty = float(sub.sum()) + 1.0
            r, c = linear_sum_assignment(sub + penalty * ~valid_c.T)
            matched[r] = cert_idx[c]
            ok = valid_c[c, r]
            credited[c[ok]] = r[ok]
        rest = np.nonzero(~cert_mask & built)[0]
        free = np.nonzero(matched < 0)[0]
        if len(rest) and len(free):
            # near copies first: the least total MSE would give up a near copy for a smaller sum over poor pairs
            sub = cost[np.ix_(free, rest)]
            near = sub <= NEAR_MSE * width**2
            r, c = linear_sum_assignment(sub + (float(sub.sum()) + 1.0) * ~near)
            matched[free[r]] = rest[c]
        rows = np.nonzero(matched >= 0)[0]
    if len(rows):  # (none where every sample came back unrebuilt and uncertified)
        cols = matched[rows]
        a, b = orig[rows], rec[cols]
        out_mse[rows] = mse(a, b).numpy()
        out_psnr[rows] = psnr(a, b, width).numpy()
        out_ssim[rows] = ssim(a, b, width).numpy()
        m = (a - b).abs().reshape(len(rows), -1).amax(1).numpy()
        out_max[rows] = np.where(np.isnan(m), np.inf, m)
        certified[rows] = cert_mask[cols]
        out_allowed[rows] = np.where(cert_mask[cols], np.fmax(tol, claims[cols]), tol)
        if pred_y is not None and true_y is not None:
            label_ok[rows] = pred_y[cols] == true_y[rows]
    if true_y is not None and pred_y is not None:
        acc = _multiset_accuracy(pred_y, true_y)
    else:
        acc = float("nan")
        label_ok[:] = matched >= 0

    # every certified reconstruction on its own
    nearest = err_c.argmin(1) if n_cert else np.zeros(0, dtype=np.int64)
    near_err = err_c[np.arange(n_cert), nearest] if n_cert else np.zeros(0)
    false_c = credited < 0
    claimed_by = {int(i): int(cert_idx[k]) for k, i in enumerate(credited) if i >= 0}
    reasons = []
    for k in range(n_cert):
        j, i = int(cert_idx[k]), int(nearest[k])
        if not false_c[k]:
            reasons.append("")
        elif not close_c[k].any():
            claim = (f"its claimed error bound {allowed_c[k]:.3g}" if allowed_c[k] > tol else
                     f"tolerance {tol:.3g} ({EXACT_TOL:g} of the data range {width:.4g})")
            reasons.append(f"certified reconstruction #{j} matches no original: the nearest, #{i}, is at max abs error "
                           f"{near_err[k]:.3g} > {claim}")
        elif not valid_c[k].any():
            i = int(np.nonzero(close_c[k])[0][0])
            reasons.append(f"certified reconstruction #{j} has the wrong label: {int(pred_y[j])}, but original #{i} "
                           f"(max abs error {err_c[k, i]:.3g}) has label {int(true_y[i])}")
        else:
            i = int(np.nonzero(valid_c[k])[0][0])
            reasons.append(f"certified reconstruction #{j} is a second certified copy of original #{i}, "
                           f"already claimed by certified reconstruction #{claimed_by.get(i, -1)}")
    return MatchResult(
        matched, out_mse, out_psnr, out_ssim, out_max, label_ok, certified, acc, out_allowed,
        data_range=(lo, hi), exact_tol=tol, n_certified=n_cert, false_certificates=int(false_c.sum()),
        certified_index=cert_idx.astype(np.int64), certified_nearest=nearest.astype(np.int64),
        certified_error=near_err.astype(np.float64), certified_original=credited.astype(np.int64),
        certified_false=false_c, certified_reason=tuple(reasons),
    )
