"""Per-image similarity scores of two batches of images (algorithms spec §7): MSE, PSNR capped at :data:`PSNR_CAP`
dB, and SSIM with the standard 11x11 Gaussian window (sigma 1.5; cut to the image for images under 11 pixels).
:func:`fedleak.metrics.match` scores a reconstruction's pairs with them."""

from __future__ import annotations

import torch

PSNR_CAP = 100.0


def as_images(x: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` as a float64 batch of N x C x H x W images (``like``'s shape per sample, where given)."""
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


def sample_psnr(a: object, b: object, data_range: float = 1.0) -> float:
    """PSNR of one sample against another (arrays or tensors of one shape), as :func:`psnr` scores a batch."""
    one = [torch.as_tensor(v).detach().to(torch.float64).reshape(1, -1) for v in (a, b)]
    return float(psnr(*one, data_range=data_range)[0])


def _gaussian_window(size: int, sigma: float, dtype) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) with an 11x11 Gaussian window, sigma 1.5, averaged over channels."""
    a, b = as_images(a), as_images(b)
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
