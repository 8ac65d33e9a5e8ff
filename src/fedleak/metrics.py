"""Image-reconstruction metrics (algorithms spec §7) and order-free matching to the originals.

All image metrics work on [0, 1] data (reconstructions are clamped first): per-image MSE, PSNR with
data range 1 (capped at :data:`PSNR_CAP` dB, where a reconstruction counts as exact), SSIM with the
standard 11x11 Gaussian window (sigma 1.5; the window is cut to the image for images under 11 pixels),
the maximum absolute error, and label accuracy. Attacks return unordered batches, so :func:`match` pairs
reconstructions with originals by a Hungarian assignment on MSE.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from fedleak.errors import FedleakError
from fedleak.reconstruction import Reconstruction

PSNR_CAP = 100.0
EXACT_TOL = 1e-4  # max abs error on [0, 1] under which a sample counts as exactly recovered


def _as_images(x: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    x = torch.as_tensor(x).detach().to(torch.float64)
    if like is not None:
        x = x.reshape(x.shape[0], *like.shape[1:])
    if x.ndim == 2:
        x = x[:, None, None, :]
    elif x.ndim == 3:
        x = x[:, None]
    return x


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error of two batches of the same shape."""
    return ((a - b) ** 2).reshape(a.shape[0], -1).mean(1)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB (standard definition, ``10 log10(range^2 / MSE)``), capped at ``PSNR_CAP``."""
    err = mse(a, b)
    val = 10 * torch.log10(data_range**2 / err.clamp_min(1e-300))
    return val.clamp(max=PSNR_CAP)


def _gaussian_window(size: int, sigma: float, dtype) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) with an 11x11 Gaussian window, sigma 1.5, averaged over channels."""
    a, b = _as_images(a), _as_images(b)
    C = a.shape[1]
    size = min(11, a.shape[-1], a.shape[-2])
    if size % 2 == 0:
        size -= 1
    g = _gaussian_window(size, 1.5, a.dtype)
    win = (g[:, None] * g[None, :]).expand(C, 1, size, size)

    def filt(x):
        return torch.nn.functional.conv2d(x, win, groups=C)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = filt(a), filt(b)
    saa = filt(a * a) - mu_a**2
    sbb = filt(b * b) - mu_b**2
    sab = filt(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (saa + sbb + c2))
    return s.reshape(s.shape[0], -1).mean(1)


@dataclass(frozen=True)
class MatchResult:
    """Scores of each original sample against the reconstruction matched to it (``-1``: none).

    Arrays have one entry per original. ``recovered`` is certified and exact (max abs error under
    :data:`EXACT_TOL`); ``false_certificate`` is certified but not exact — it must never happen.
    """

    matched: np.ndarray
    mse: np.ndarray
    psnr: np.ndarray
    ssim: np.ndarray
    max_abs_error: np.ndarray
    label_correct: np.ndarray
    certified: np.ndarray
    label_accuracy: float

    @property
    def exact(self) -> np.ndarray:
        return (self.matched >= 0) & (self.max_abs_error < EXACT_TOL)

    @property
    def recovered(self) -> np.ndarray:
        return self.exact & self.certified & self.label_correct

    @property
    def false_certificate(self) -> np.ndarray:
        return self.certified & ~(self.exact & self.label_correct)

    @property
    def recovered_fraction(self) -> float:
        return float(self.recovered.mean())

    def mean_psnr(self) -> float:
        """Mean PSNR over matched originals (nan when nothing matched)."""
        sel = self.matched >= 0
        return float(self.psnr[sel].mean()) if sel.any() else float("nan")

    def to_dict(self) -> dict[str, object]:
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
            "false_certificate": self.false_certificate.tolist(),
            "label_accuracy": self.label_accuracy,
            "recovered_fraction": self.recovered_fraction,
        }


def _multiset_accuracy(pred: np.ndarray, true: np.ndarray) -> float:
    if len(true) == 0:
        return float("nan")
    k = int(max(pred.max(initial=0), true.max(initial=0))) + 1
    return float(np.minimum(np.bincount(pred, minlength=k), np.bincount(true, minlength=k)).sum() / len(true))


def match(
    reconstructed: Reconstruction | torch.Tensor,
    originals: torch.Tensor,
    labels: torch.Tensor | None = None,
) -> MatchResult:
    """Pair reconstructions with originals (Hungarian assignment on MSE) and score every original.

    Certified reconstructions are assigned first, then the uncertified ones to the originals left.

    ``reconstructed`` is a :class:`Reconstruction` (its labels and certificates are used) or a tensor of
    images. Unmatched originals (the attack found fewer samples) get NaN scores and ``matched = -1``.
    Label accuracy is the order-free multiset overlap of rebuilt and true labels, over all originals.
    """
    if isinstance(reconstructed, Reconstruction):
        rec_x, rec_y, cert = reconstructed.inputs, reconstructed.labels, reconstructed.certified
    else:
        rec_x, rec_y, cert = torch.as_tensor(reconstructed), None, None
    orig = _as_images(originals)
    if orig.shape[0] == 0:
        raise FedleakError("no originals to match against")
    n_orig = orig.shape[0]
    n_rec = int(rec_x.shape[0])
    if n_rec and rec_x[0].numel() != orig[0].numel():
        raise FedleakError(
            f"reconstructions have {rec_x[0].numel()} values per sample but originals have {orig[0].numel()}"
        )
    rec = _as_images(rec_x, orig).clamp(0, 1) if n_rec else orig[:0]
    matched = np.full(n_orig, -1)
    out_mse = np.full(n_orig, np.nan)
    out_psnr = np.full(n_orig, np.nan)
    out_ssim = np.full(n_orig, np.nan)
    out_max = np.full(n_orig, np.inf)
    label_ok = np.zeros(n_orig, dtype=bool)
    certified = np.zeros(n_orig, dtype=bool)
    if n_rec:
        flat_o, flat_r = orig.reshape(n_orig, -1), rec.reshape(n_rec, -1)
        cost = torch.cdist(flat_o, flat_r).pow(2).numpy() / flat_o.shape[1]
        # certified reconstructions claim to be samples of the batch: they are matched first, so that an
        # uncertified blend of two originals can never push a certified sample off its own original
        first = np.nonzero(cert.numpy())[0] if cert is not None else np.arange(n_rec)
        rest = np.setdiff1d(np.arange(n_rec), first)
        for group in (first, rest):
            free = np.nonzero(matched < 0)[0]
            if len(group) == 0 or len(free) == 0:
                continue
            r, c = linear_sum_assignment(cost[np.ix_(free, group)])
            matched[free[r]] = group[c]
        rows = np.nonzero(matched >= 0)[0]
        cols = matched[rows]
        a, b = orig[rows], rec[cols]
        out_mse[rows] = mse(a, b).numpy()
        out_psnr[rows] = psnr(a, b).numpy()
        out_ssim[rows] = ssim(a, b).numpy()
        out_max[rows] = (a - b).abs().reshape(len(rows), -1).amax(1).numpy()
        if cert is not None:
            certified[rows] = cert.numpy()[cols]
        if rec_y is not None and labels is not None:
            label_ok[rows] = rec_y.numpy()[cols] == torch.as_tensor(labels).numpy()[rows]
    if labels is not None and rec_y is not None:
        acc = _multiset_accuracy(rec_y.numpy().astype(np.int64), torch.as_tensor(labels).numpy().astype(np.int64))
    else:
        acc = float("nan")
        label_ok[:] = matched >= 0
    return MatchResult(matched, out_mse, out_psnr, out_ssim, out_max, label_ok, certified, acc)
