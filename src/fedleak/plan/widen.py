"""New neurons for a wider dense layer, drawn like the layer's own, and their activity on the measured samples.

A proposed change that widens a layer is checked on neurons that do not exist yet. They are drawn like the
layer's own: every weight and the bias Gaussian with the mean and spread of the layer's weights and biases (for
PyTorch's default initialisation, the same spread as its uniform draw). A new neuron's pre-activations on the n
measured samples ``z = A w + b`` (``A``: the layer's inputs, n x d) are then jointly Gaussian with mean
``mu_w A 1 + mu_b`` and covariance ``s_w^2 A A^T + s_b^2 1 1^T``; they are drawn from a factor ``R`` of that
covariance (``R R^T``; n x min(d + 1, n)), in chunks seeded by their index, so any chunk can be drawn again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CHUNK = 256  # new neurons per draw


@dataclass(frozen=True)
class Widening:
    """What drawing a new neuron of one layer needs: ``mean`` (n,) and ``factor`` (n x r) of its pre-activations
    on the measured samples, and the seed of the draws."""

    mean: torch.Tensor
    factor: torch.Tensor
    seed: int = 0

    def chunk(self, c: int) -> torch.Tensor:
        """Whether each of the new neurons ``c * CHUNK .. (c + 1) * CHUNK - 1`` fires for each sample (n x CHUNK)."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + c)
        xi = torch.randn(self.factor.shape[1], CHUNK, generator=gen, dtype=self.factor.dtype)
        return (self.mean[:, None] + self.factor @ xi) > 0


def widening(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, seed: int = 0) -> Widening:
    """The :class:`Widening` of a layer with ``weight`` (width x d) and ``bias`` reading ``inputs`` (n x d)."""
    a = inputs.detach().to(torch.float32).cpu()
    w = weight.detach().to(torch.float64).cpu()
    mu_w, s_w = float(w.mean()), (float(w.std()) if w.numel() > 1 else 0.0)
    if bias is None:
        mu_b, s_b = 0.0, 0.0
    else:
        b = bias.detach().to(torch.float64).cpu()
        mu_b, s_b = float(b.mean()), (float(b.std()) if b.numel() > 1 else 0.0)
    n, d = a.shape
    mean = mu_w * a.to(torch.float64).sum(1) + mu_b
    if d + 1 <= n:
        factor = torch.cat([s_w * a.to(torch.float64), torch.full((n, 1), s_b, dtype=torch.float64)], 1)
    else:
        cov = s_w ** 2 * (a @ a.T).to(torch.float64) + s_b ** 2
        jitter = 1e-10 * float(cov.diagonal().mean()) * torch.eye(n, dtype=cov.dtype)
        factor, info = torch.linalg.cholesky_ex(cov + jitter)
        if int(info) != 0:  # singular (repeated samples): a symmetric square root
            vals, vecs = torch.linalg.eigh(cov)
            factor = vecs * vals.clamp_min(0).sqrt()
    return Widening(mean.to(torch.float32), factor.to(torch.float32), seed)
