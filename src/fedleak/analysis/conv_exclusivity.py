"""Exclusivity analysis of CNN batches (algorithms spec §1.3): unit- and channel-level ExANs of every conv
layer, the FC head's ExANs, and which samples the CNN attack can *certify*.

* **Unit level:** every post-ReLU unit (channel, y, x) of a conv layer is a neuron.
* **Channel level:** channel k is exclusive to sample m when m has a positive unit in k and no other
  sample has any (only then is the weight-gradient slice ``dL/dW[k]`` pure in one sample).
* **Certifiable** (what :func:`fedleak.attacks.conv_exclusivity.conv_exclusivity_attack` can prove):
  the FC head meets the MLP condition on the flattened features (>= 2 effective ExANs at the last ReLU
  layer of the head, >= 1 at its other layers) **and** every conv block is *solvable* for the sample:
  its surely active units (pooled: its non-zero pooled units, with a Gordan certificate) determine the
  block's input uniquely, with a proven error bound, chained down to the input, below ``max_error``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedleak.analysis.exclusivity import ExclusivityReport, analyze_exclusivity
from fedleak.errors import FedleakError
from fedleak.models.convnet import as_relu_cnn


@dataclass(frozen=True)
class ConvLayerExclusivity:
    """Unit- and channel-level exclusivity of one conv layer (post-ReLU, before pooling) for M samples."""

    name: str
    units: int
    channels: int
    active_units: np.ndarray  # (M,)
    unit_exans: np.ndarray  # (M,) units active for this sample only
    effective_unit_exans: np.ndarray  # (M,) of those, with a non-zero backward signal
    active_channels: np.ndarray  # (M,) channels with any active unit
    channel_exans: np.ndarray  # (M,) channels active for this sample only
    effective_channel_exans: np.ndarray  # (M,) of those, with a non-zero backward signal somewhere
    dead_unit_fraction: float
    shared_unit_fraction: float
    solvable: np.ndarray  # (M,) this block's input is uniquely determined by its output (proven)
    bound: np.ndarray  # (M,) proven 2-norm error bound of the block's input (inf when not proven)


@dataclass(frozen=True)
class ConvExclusivityReport(ExclusivityReport):
    """:class:`ExclusivityReport` of the FC head (``layers``) plus the conv layers.

    ``certifiable`` is the CNN condition (head condition and every conv block solvable);
    ``head_certifiable`` the head condition alone (Pan et al.'s count on the features).
    """

    conv_layers: tuple[ConvLayerExclusivity, ...] = ()
    head_certifiable: np.ndarray | None = None
    error_bound: np.ndarray | None = None  # (M,) chained bound on the input (inf where unsolvable)
    max_error: float = 1.0

    def summary(self) -> str:
        conv = ", ".join(
            f"{c.name}: median {float(np.median(c.unit_exans)):g} unit / {float(np.median(c.channel_exans)):g} "
            f"channel ExANs, {int(c.solvable.sum())}/{len(c.solvable)} solvable"
            for c in self.conv_layers
        )
        head = int(self.head_certifiable.sum()) if self.head_certifiable is not None else 0
        return (f"{int(self.certifiable.sum())}/{self.batch_size} samples certifiable (FC head alone: {head}); "
                f"{conv}; head: " + super().summary().split("; ", 2)[-1])

    def to_dict(self) -> dict[str, object]:
        d = super().to_dict()
        d["condition"] = {
            "min_exans_last_layer": self.min_last, "min_exans_other_layers": self.min_other,
            "conv_blocks_solvable": True, "max_error": self.max_error,
        }
        d["head_certifiable"] = None if self.head_certifiable is None else self.head_certifiable.tolist()
        d["error_bound"] = None if self.error_bound is None else [float(b) for b in self.error_bound]
        d["conv_layers"] = [
            {
                "name": c.name, "units": c.units, "channels": c.channels,
                "active_units": c.active_units.tolist(), "unit_exans": c.unit_exans.tolist(),
                "effective_unit_exans": c.effective_unit_exans.tolist(),
                "active_channels": c.active_channels.tolist(), "channel_exans": c.channel_exans.tolist(),
                "effective_channel_exans": c.effective_channel_exans.tolist(),
                "dead_unit_fraction": c.dead_unit_fraction, "shared_unit_fraction": c.shared_unit_fraction,
                "solvable": c.solvable.tolist(), "bound": [float(b) for b in c.bound],
            }
            for c in self.conv_layers
        ]
        return d


def analyze_conv_exclusivity(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    input_shape: tuple[int, int, int] | None = None,
    min_last: int = 2,
    min_other: int = 1,
    solve: bool = True,
    **attack_options,
) -> ConvExclusivityReport:
    """Unit/channel ExAN counts of every conv layer and the FC head, and the certifiable mask.

    ``solve=False`` skips the per-sample solvability check (then nothing is certifiable: only counts).
    ``attack_options`` are fields of :class:`~fedleak.attacks.conv_exclusivity.ConvExclusivityOptions`.
    """
    from fedleak.attacks.conv_exclusivity import ConvExclusivityOptions, EPS32, invert_block

    net = as_relu_cnn(model, input_shape)
    if not isinstance(inputs, torch.Tensor) or inputs.ndim < 2 or inputs.shape[0] == 0:
        raise FedleakError("inputs must be a non-empty batch tensor (M x C x H x W)")
    if inputs[0].numel() != int(np.prod(net.input_shape)):
        raise FedleakError(f"each input has {inputs[0].numel()} values but the model takes {net.input_shape}")
    if not torch.isfinite(inputs).all():
        raise FedleakError("the inputs hold NaN or inf values")
    opts = ConvExclusivityOptions(**attack_options)
    dtype = net.blocks[0].conv.module.weight.dtype
    M = inputs.shape[0]
    x = inputs.reshape(M, *net.input_shape).to(dtype).detach().requires_grad_(True)
    # forward with the conv pre-activations kept, then per-sample backward signals by autograd
    # (samples are independent: eval-mode BN, no cross-sample ops)
    pres, acts = [], [x]
    a = x
    for blk in net.blocks:
        z = blk.preact(a, dtype)
        pres.append(z)
        a = blk.apply_pool(torch.relu(z))
        acts.append(a)
    feats = a.reshape(M, -1)
    head = nn.Sequential(*[m for d in net.head.dense for m in (d.module, nn.ReLU())][:-1])
    logits = head(feats)
    if labels is None:
        labels = logits.argmax(1)
    labels = torch.as_tensor(labels).long().reshape(-1)
    if labels.shape[0] != M:
        raise FedleakError(f"{M} inputs but {labels.shape[0]} labels")
    if labels.min() < 0 or labels.max() >= net.num_classes:
        raise FedleakError(f"labels must lie in [0, {net.num_classes - 1}]")
    loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
    deltas = torch.autograd.grad(loss, pres)
    head_report = analyze_exclusivity(head, feats.detach(), labels.detach(), min_last=min_last, min_other=min_other)

    # solvability, top block first, from the true activations (what the attack would see)
    solvable = np.zeros((len(net.blocks), M), dtype=bool)
    bounds = np.full((len(net.blocks), M), np.inf)
    chain = np.full(M, np.inf)
    if solve:
        for m in range(M):
            err2 = 0.0
            f = acts[-1][m].detach().to(torch.float64).reshape(-1).numpy()
            err = opts.ratio_noise * EPS32 * np.abs(f)
            ok = True
            for i in range(len(net.blocks) - 1, -1, -1):
                out = acts[i + 1][m].detach().to(torch.float64).reshape(-1).numpy()
                s = invert_block(net.blocks[i], out, err if i == len(net.blocks) - 1 else np.zeros(len(out)), opts, err2)
                solvable[i, m] = s.unique
                bounds[i, m] = s.bound
                ok = ok and s.unique
                err2 = s.bound if s.unique else np.inf
            chain[m] = err2 if ok else np.inf
    conv_layers = []
    for i, (blk, z, d) in enumerate(zip(net.blocks, pres, deltas)):
        act = (z.detach() > 0).reshape(M, blk.conv_shape[0], -1)
        dd = d.reshape(M, blk.conv_shape[0], -1)
        per_unit = act.sum(0)
        excl = act & (per_unit == 1)
        eff = excl & (dd != 0)
        ch_act = act.any(2)
        ch_excl = ch_act & (ch_act.sum(0) == 1)
        ch_eff = ch_excl & ((dd != 0) & act).any(2)
        conv_layers.append(ConvLayerExclusivity(
            name=blk.name, units=blk.conv_dim, channels=blk.conv_shape[0],
            active_units=act.reshape(M, -1).sum(1).numpy(), unit_exans=excl.reshape(M, -1).sum(1).numpy(),
            effective_unit_exans=eff.reshape(M, -1).sum(1).numpy(), active_channels=ch_act.sum(1).numpy(),
            channel_exans=ch_excl.sum(1).numpy(), effective_channel_exans=ch_eff.sum(1).numpy(),
            dead_unit_fraction=float((per_unit == 0).float().mean()),
            shared_unit_fraction=float((per_unit >= 2).float().mean()),
            solvable=solvable[i], bound=bounds[i],
        ))
    head_ok = head_report.certifiable
    cert = head_ok & solvable.all(0) & (chain <= opts.max_error)
    return ConvExclusivityReport(
        layers=head_report.layers, labels=labels.numpy(), certifiable=cert, min_last=min_last, min_other=min_other,
        conv_layers=tuple(conv_layers), head_certifiable=head_ok, error_bound=chain, max_error=opts.max_error,
    )
