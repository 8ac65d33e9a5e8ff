"""Neuron-exclusivity analysis (algorithms spec §1, §1.3): who can be rebuilt from a batch's gradient.

An exclusively activated neuron (ExAN) of a batch is a ReLU that fires for exactly one sample. A sample
with at least two *effective* ExANs at the last ReLU layer of the fully connected head and at least one at
every other ReLU layer of the head is reconstructable exactly from the averaged gradient (Pan et al., USENIX
Security 2022); a batch all of whose samples are is on the insecure side of the boundary. A neuron is an
effective ExAN of a sample when its gradient row is that sample's alone in the client's sum: the sample fires it
with a non-zero backward signal, and any other sample that fires it holds a share of the row too small for the
sum to hear (:mod:`fedleak.nets.shares`: a sample the model classifies with probability 1 in its dtype).

An MLP is a network without conv blocks; for a network with conv blocks the same head count runs on the
flattened features, every conv layer is also counted at unit and channel level, and a sample is
*certifiable* (what the exclusivity attack, :mod:`fedleak.attacks.exact`, can prove) when
the head condition holds **and** every conv block is *solvable* for it: its surely active units (pooled:
its non-zero pooled units, with a Gordan certificate) determine the block's input uniquely, with a proven
error bound, chained down to the input, within the error the attack allows a certified input
(``max_error`` of the data range, :class:`fedleak.attacks.exact.ExclusivityOptions`).

The attack then *peels* an MLP's update (:mod:`fedleak.attacks.exact.peeling`): once samples are certified, their
terms are subtracted and exclusivity is counted again among the samples left, round after round. A sample that
meets the condition only then is *peeled*; it is certifiable too.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedleak.analysis.batch import Batch, read_batch
from fedleak.analysis.report import ConvLayerExclusivity, ExclusivityReport, LayerExclusivity
from fedleak.autograd_mode import autograd_on, with_autograd
from fedleak.errors import ModelError
from fedleak.nets import NO_HIDDEN_RELU, Network, Trace, forward_trace, readable_losses
from fedleak.nets.exact_view import first_layer_view
from fedleak.nets.shares import heard_alone, row_shares
from fedleak.validation import check_batch


@with_autograd
def analyze_exclusivity(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    min_last: int = 2,
    min_other: int = 1,
    solve: bool = True,
    peel: bool = True,
    **attack_options,
) -> ExclusivityReport:
    """Count, per sample and ReLU layer, the exclusively activated neurons of a batch.

    ``model`` is any ``nn.Module`` :func:`fedleak.nets.as_network` reads (its input shape comes from
    ``inputs``). Activation patterns are computed in the model's own dtype, exactly as the client computes
    them. ``labels`` fix the backward signal that decides whether an ExAN is effective; without them the
    model's predictions are used. A sample is *certifiable* when it has at least ``min_last`` effective
    ExANs at the head's last ReLU layer and ``min_other`` at every other one, and (conv blocks only) every
    block is solvable with a proof. ``solve=False`` skips that per-sample check (then nothing with conv
    blocks is certifiable: only counts; ``head_certifiable`` still holds the head condition). ``peel``: an MLP's
    samples that meet the condition once those that meet it are peeled off, round after round (the attack's reading
    of an update whose batch size is reported, at a known scale), are certifiable too (``peeled``); False: the
    condition on the update as sent only.
    ``attack_options`` are fields of :class:`~fedleak.attacks.exact.ExclusivityOptions` (its conv-block
    noise model and exactness: ``ratio_noise``, ``rounding``, ``max_error``, ``data_range``, ...).
    """
    if not isinstance(model, Network):  # a normalisation inside forward: what its first layer reads is counted
        model, inputs, input_map = first_layer_view(model, check_batch(inputs))
        if input_map is not None and attack_options.get("data_range") is not None:
            from fedleak.attacks.exact import ExclusivityOptions  # (heavy: imported here)

            tol, data_range = input_map.tolerance_in_first_layer(
                attack_options.get("exact_tol", ExclusivityOptions.exact_tol), attack_options["data_range"])
            attack_options = {**attack_options, "data_range": data_range, "exact_tol": tol}
    return batch_exclusivity(read_batch(model, inputs, labels), min_last=min_last, min_other=min_other,
                             solve=solve, peel=peel, **attack_options)


def batch_exclusivity(batch: Batch, *, min_last: int = 2, min_other: int = 1, solve: bool = True, peel: bool = True,
                      **attack_options) -> ExclusivityReport:
    """:func:`analyze_exclusivity` of a batch already read (:func:`fedleak.analysis.batch.read_batch`)."""
    net = batch.net
    if net.head.depth == 0:
        raise ModelError(NO_HIDDEN_RELU)
    opts = None
    if (net.blocks and solve) or attack_options:
        from fedleak.attacks.exact import ExclusivityOptions  # the attack's noise model (heavy: imported here)

        opts = ExclusivityOptions(**attack_options)
    dtype, labels = batch.dtype, batch.labels.to(net.device)
    pres, deltas, acts = _conv_pass(net, batch.x, labels, dtype) if net.blocks else ([], [], [])
    feats = acts[-1].reshape(batch.size, -1) if net.blocks else net.features(batch.x, dtype)
    with torch.no_grad():
        trace = forward_trace(net.head, feats, labels, dtype=dtype)
    readable = readable_losses(trace.loss_vectors)  # a sample classified with probability 1 has no effective ExAN
    layers, head_ok = _head_layers(net, trace, readable, min_last, min_other)
    labels_np = batch.labels.numpy()
    saturated = (~readable).cpu().numpy()
    if not net.blocks:
        peeled = _peeled(trace, readable, torch.from_numpy(head_ok).to(readable.device), min_last, min_other) if peel \
            else np.zeros_like(head_ok)
        return ExclusivityReport(layers=layers, labels=labels_np, certifiable=head_ok | peeled, min_last=min_last,
                                 min_other=min_other, head_certifiable=head_ok, saturated=saturated, peeled=peeled)
    solvable, bounds, chain = _solvability(net, acts, opts) if solve else _unsolved(len(net.blocks), batch.size)
    conv_layers = tuple(_conv_layer(blk, z, d, solvable[i], bounds[i])
                        for i, (blk, z, d) in enumerate(zip(net.blocks, pres, deltas)))
    # the attack's rule (fedleak.attacks.exact.pipeline): a bound within max_error of the data range
    allowed = None if opts is None else opts.max_error * opts.range_width(batch.x.to(torch.float64).cpu().numpy())
    cert = head_ok & solvable.all(0) & (chain <= (np.inf if allowed is None else allowed))
    return ExclusivityReport(
        layers=layers, labels=labels_np, certifiable=cert, min_last=min_last, min_other=min_other,
        conv_layers=conv_layers, head_certifiable=head_ok, error_bound=chain, allowed_error=allowed,
        saturated=saturated,
    )


def _kth_largest(values: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the k-th largest of ``values`` where ``mask`` holds (0 where fewer than k)."""
    filled = torch.where(mask, values, torch.full_like(values, -torch.inf))
    if k > filled.shape[1]:
        return torch.zeros(filled.shape[0], dtype=values.dtype, device=values.device)
    top = torch.topk(filled, k, dim=1).values[:, k - 1]
    return torch.where(torch.isfinite(top), top, torch.zeros_like(top))


def _head_layers(net: Network, trace: Trace, readable: torch.Tensor, min_last: int, min_other: int
                 ) -> tuple[tuple[LayerExclusivity, ...], np.ndarray]:
    """ExAN statistics of the head's ReLU layers and the head condition per sample (``readable``: the samples whose
    loss vector has a negative entry, :func:`fedleak.nets.readable_losses`)."""
    layers = []
    M = trace.logits.shape[0]
    depth = net.head.depth
    counts_ok = torch.ones(M, dtype=torch.bool, device=trace.logits.device)
    readable = readable[:, None]
    for h, z in enumerate(trace.preactivations):
        active = z > 0
        per_neuron = active.sum(0)
        exclusive = active & (per_neuron == 1)
        effective = heard_alone(_shares(trace, h)) & readable
        need = min_last if h == depth - 1 else min_other
        # slack: how far the neuron is from losing exclusivity (own activation vs. the others' highest)
        if M > 1:
            top2 = torch.topk(z, 2, dim=0).values
            others_max = torch.where(z >= top2[0], top2[1], top2[0])
        else:
            others_max = torch.full_like(z, -torch.inf)
        slack = torch.minimum(z, -others_max).to(torch.float64)
        margin = (_kth_largest(slack, effective, need) if need > 0
                  else torch.zeros(M, dtype=torch.float64, device=z.device))
        layers.append(LayerExclusivity(
            name=net.head.dense[h].name, width=int(z.shape[1]), active=active.sum(1).cpu().numpy(),
            exans=exclusive.sum(1).cpu().numpy(), effective_exans=effective.sum(1).cpu().numpy(),
            margin=margin.cpu().numpy(), dead_fraction=float((per_neuron == 0).float().mean()),
            shared_fraction=float((per_neuron >= 2).float().mean()),
        ))
        counts_ok &= effective.sum(1) >= need
    return tuple(layers), counts_ok.cpu().numpy()


def _peeled(trace: Trace, readable: torch.Tensor, first: torch.Tensor, min_last: int, min_other: int) -> np.ndarray:
    """Per sample, whether it meets the head condition only once the samples that meet it are peeled off, round
    after round: its effective ExANs counted among the samples not yet certifiable (exclusivity's closure; the
    attack's rounds may stop short of it where the float32 rounding of the subtracted terms leaves rows too noisy)."""
    done = first.clone()
    depth = len(trace.preactivations)
    shares = [_shares(trace, h) for h in range(depth)]
    while not bool(done.all()):
        left = ~done
        new = left.clone()
        for h in range(depth):
            effective = heard_alone(shares[h] * left[:, None]) & readable[:, None]
            new &= effective.sum(1) >= (min_last if h == depth - 1 else min_other)
        if not bool(new.any()):
            break
        done |= new
    return (done & ~first).cpu().numpy()


def _shares(trace: Trace, h: int) -> torch.Tensor:
    """Each sample's share of hidden layer ``h``'s gradient rows (:func:`fedleak.nets.shares.row_shares`)."""
    return row_shares(trace.preactivations[h], trace.deltas[h], trace.activations[h])


def _conv_pass(net: Network, x: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype
               ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Conv pre-activations, their per-sample backward signals (autograd: the samples are independent,
    BN is in eval mode) and the activations (input, then each block's output)."""
    with autograd_on():
        a = x.detach().to(dtype).requires_grad_(True)
        run = net.conv_pass(a, dtype)
        out = forward_trace(net.head, run.features, dtype=dtype).logits
        loss = torch.nn.functional.cross_entropy(out, labels, reduction="sum")
        deltas = torch.autograd.grad(loss, run.preacts)
    acts = [a, *run.outputs]
    return [z.detach() for z in run.preacts], [d.detach() for d in deltas], [a.detach() for a in acts]


def _unsolved(blocks: int, M: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.zeros((blocks, M), dtype=bool), np.full((blocks, M), np.inf), np.full(M, np.inf)


def _solvability(net: Network, acts: list[torch.Tensor], opts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per block and sample: solvable with a proof, and the proven bound; per sample the chained bound.
    Top block first, from the true activations (what the attack would see)."""
    from fedleak.attacks.exact import EPS32, invert_block

    nb, M = len(net.blocks), acts[0].shape[0]
    solvable, bounds, chain = _unsolved(nb, M)
    host = [a.to(torch.float64).reshape(M, -1).cpu().numpy() for a in acts]
    for m in range(M):
        err2 = 0.0
        err = opts.feature_error(host[-1][m], EPS32)
        ok = True
        for i in range(nb - 1, -1, -1):
            out = host[i + 1][m]
            s = invert_block(net.blocks[i], out, err if i == nb - 1 else np.zeros(len(out)), opts, err2)
            solvable[i, m] = s.unique
            bounds[i, m] = s.bound
            ok = ok and s.unique
            err2 = s.bound if s.unique else np.inf
        chain[m] = err2 if ok else np.inf
    return solvable, bounds, chain


def _conv_layer(blk, z: torch.Tensor, d: torch.Tensor, solvable: np.ndarray, bound: np.ndarray) -> ConvLayerExclusivity:
    M, C = z.shape[0], blk.conv_shape[0]
    act = (z > 0).reshape(M, C, -1)
    dd = d.reshape(M, C, -1)
    per_unit = act.sum(0)
    excl = act & (per_unit == 1)
    eff = excl & (dd != 0)
    ch_act = act.any(2)
    ch_excl = ch_act & (ch_act.sum(0) == 1)
    ch_eff = ch_excl & ((dd != 0) & act).any(2)
    count = lambda t: t.reshape(M, -1).sum(1).cpu().numpy()  # noqa: E731
    return ConvLayerExclusivity(
        name=blk.name, units=blk.conv_dim, channels=C, active_units=count(act), unit_exans=count(excl),
        effective_unit_exans=count(eff), active_channels=count(ch_act), channel_exans=count(ch_excl),
        effective_channel_exans=count(ch_eff), dead_unit_fraction=float((per_unit == 0).float().mean()),
        shared_unit_fraction=float((per_unit >= 2).float().mean()), solvable=solvable, bound=bound,
    )
