"""Imprint bins ("Robbing the Fed", Fowl et al., ICLR 2022) inside the same architecture: the server-side change
of the first two layers, and the ``"imprint"`` attack that reads it (see :mod:`fedleak.attacks.malicious`)."""

from __future__ import annotations

import copy
import time

import torch
from torch import nn

from fedleak.attacks.malicious.certify import (
    Candidates,
    MaliciousOptions,
    certify_candidates,
    finish,
    resolve_options,
    with_sign_read,
)
from fedleak.attacks.malicious.proofs import BinCount
from fedleak.attacks.malicious.read_layer import first_layer, first_two_dense, ratio_bound
from fedleak.attacks.masked_input import first_reader, input_masking
from fedleak.attacks.registry import register_attack
from fedleak.errors import FedleakError, ModelError, OptionError
from fedleak.reconstruction import Reconstruction
from fedleak.weight_change import either_sign

F64 = torch.float64


def measurement_vector(kind: str, dim: int, seed: int) -> torch.Tensor:
    """The imprint's linear measurement ``a`` (``"mean"``: pixel mean; ``"random"``: a seeded unit vector)."""
    if kind == "mean":
        return torch.full((dim,), 1.0 / dim, dtype=F64)
    if kind == "random":
        gen = torch.Generator().manual_seed(int(seed))
        a = torch.randn(dim, generator=gen, dtype=F64)
        return a / a.norm()
    raise FedleakError(f"unknown imprint measurement '{kind}'; use 'mean' or 'random'")


def imprint_weights(model: nn.Module, data_for_quantiles: torch.Tensor, bins: int | None = None, *,
                    measurement: str = "random", seed: int = 0, column_scale: float = 0.01,
                    weight_scale: float = 0.01, inplace: bool = False) -> nn.Module:
    """Return ``model`` with a "Robbing the Fed" imprint in its first layer (same architecture).

    The first ``bins`` rows (default: all rows of the first layer) are set to the measurement ``a``
    (``"mean"``: pixel mean, ``"random"``: a seeded unit random projection), the biases to ``-c_i`` with
    ``c_i`` the ``i/bins`` quantiles of ``h(x) = a . x`` over ``data_for_quantiles`` (public or held-out
    data, never the clients'; ``c_0`` lies below all of it). The next layer's columns of these rows are
    set to one shared column (``column_scale`` times a seeded normal vector), so that a sample's signal
    is identical on every bin it opens. Rows and biases are multiplied by ``weight_scale`` (which
    neurons fire does not change): small first-layer values keep a one-step float32 weight delta
    ``before - after`` free of cancellation error. The model is copied unless ``inplace``.
    """
    if weight_scale <= 0:
        raise FedleakError(f"imprint weight_scale must be positive, got {weight_scale}")
    model = model if inplace else copy.deepcopy(model)
    net, first, second = first_two_dense(model)
    width = first.out_features
    bins = width if bins is None else int(bins)
    if not 2 <= bins <= width:
        raise FedleakError(f"imprint bins must lie in [2, {width}] (the first layer's width), got {bins}")
    pub = torch.as_tensor(data_for_quantiles).reshape(len(data_for_quantiles), -1).to(device="cpu", dtype=F64)
    if pub.shape[1] != first.in_features:
        raise FedleakError(
            f"data_for_quantiles has {pub.shape[1]} values per sample; the first layer takes {first.in_features}"
        )
    if pub.shape[0] < 2:
        raise FedleakError("imprint quantiles need at least 2 public samples")
    a = measurement_vector(measurement, first.in_features, seed)
    h = pub @ a
    levels = torch.arange(bins, dtype=F64) / bins
    c = torch.quantile(h, levels)
    spread = float(h.max() - h.min()) or 1.0
    c[0] = float(h.min()) - spread  # the first bin opens for every sample
    c = torch.cummax(c, 0).values
    gen = torch.Generator().manual_seed(int(seed) + 1)
    col = torch.randn(second.out_features, generator=gen, dtype=F64) * column_scale
    with torch.no_grad():
        first.weight[:bins] = (weight_scale * a).to(first.weight.dtype)
        first.bias[:bins] = (-weight_scale * c).to(first.bias.dtype)
        second.weight[:, :bins] = col.to(second.weight.dtype)[:, None]
    return model


@register_attack("imprint", update_kinds=("gradient", "weights"), needs_relu_network=True,
                 description="malicious imprint bins in the first layer (Robbing the Fed): certified bin differences")
def imprint_attack(model: nn.Module, update, *, bins: int | None = None, input_shape: tuple[int, ...] | None = None,
                   options: MaliciousOptions | None = None, **overrides) -> Reconstruction:
    """Rebuild the samples alone in an imprint bin of a model made by :func:`imprint_weights`.

    The bins are found from the model itself: the leading first-layer rows that share one weight vector
    (``bins`` forces their number). Bins are sorted by threshold; the difference of consecutive bins'
    gradients isolates the samples between the two thresholds, and a candidate must open its bin and
    not the next one. ``input_shape`` (one sample) defaults to what :func:`fedleak.nets.as_network` finds. A change
    whose sign was not read (two or three classes) is tried with the other sign where this one certifies nothing
    (:func:`~fedleak.weight_change.either_sign`).
    """
    opts = resolve_options(options, overrides)
    if opts.focal_gamma:
        raise OptionError("the imprint attack's counting proof bounds the cross-entropy's loss vectors: it takes no "
                          "focal_gamma (on a focal client's update it stays sound, read as a cross-entropy client's)")
    return either_sign(lambda u: _imprinted(model, u, bins, input_shape, opts), update)


def _imprinted(model: nn.Module, update, bins: int | None, input_shape: tuple[int, ...] | None,
               opts: MaliciousOptions) -> Reconstruction:
    """:func:`imprint_attack` on ``update`` as it is."""
    start = time.perf_counter()
    net, G, g, n_examples, (nG, ng), _ = first_layer(model, update, "imprint", input_shape)
    W0, b0 = net.head.weights()[0], net.head.biases()[0]
    if bins is None:
        same = (W0 - W0[0]).abs().amax(1) <= 1e-7 * float(W0[0].abs().max().clamp_min(1e-300))
        bins = int(same.int().cumprod(0).sum())
    if not 2 <= bins <= W0.shape[0]:
        raise ModelError("the model's first layer holds no imprint bins "
                         "(see fedleak.attacks.malicious.imprint_weights)")
    order = torch.argsort(-b0[:bins])  # thresholds c_i = -b_i ascending
    G, g, nG, ng = G[:bins][order], g[:bins][order], nG[:bins][order], ng[:bins][order]
    idx = order.tolist()
    dG = torch.cat([G[:-1] - G[1:], G[-1:]])
    dg = torch.cat([g[:-1] - g[1:], g[-1:]])
    keep = torch.nonzero(dg.abs() > opts.min_bias * float(dg.abs().max().clamp_min(1e-300))).flatten().tolist()
    X = dG[keep] / dg[keep, None] if keep else torch.empty(0, G.shape[1], dtype=F64, device=G.device)
    dnG = torch.cat([(nG[:-1] ** 2 + nG[1:] ** 2).sqrt(), nG[-1:]])
    dng = torch.cat([(ng[:-1] ** 2 + ng[1:] ** 2).sqrt(), ng[-1:]])
    filled = (dg.abs() > 4 * dng) | ((dG.abs() > 4 * dnG[:, None]).any(1))  # each holds a sample (or more)
    count = BinCount(int(filled.sum()), int(filled.sum()) - int(filled[keep].sum()), tuple(filled[keep].tolist()))
    cands = Candidates(X, [[idx[k]] for k in keep], [dg[k : k + 1] for k in keep],
                       [[idx[k + 1]] if k + 1 < bins else [] for k in keep],
                       bound=ratio_bound(X, dnG[keep], dng[keep], dg[keep]), bins=count)
    verdicts, batch_scale = certify_candidates(net.head, cands, n_examples, opts)
    notes = [] if batch_scale is not None or not keep else ["no common scale: no candidate could be certified"]
    masking = input_masking(model, first_reader(net), net.input_shape)  # (:mod:`fedleak.attacks.masked_input`)
    # (a certified bin passed the counting proof, which pins the voted scale: at k >= 2 times the true one, every
    # candidate at it would fill a bin of several samples, and the proof needs more of them than such bins; so no
    # blend of near-copies needs ruling out here, as trap weights' :func:`without_unpinned_blends` does)
    rec = finish(net, "imprint", cands, verdicts, n_examples, opts, start, notes, masking)
    return with_sign_read(model, update, opts, rec)
