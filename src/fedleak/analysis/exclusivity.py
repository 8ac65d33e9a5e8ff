"""Neuron-exclusivity analysis (algorithms spec §1): who can be rebuilt from a batch's gradient.

An exclusively activated neuron (ExAN) of a batch is a ReLU that fires for exactly one sample. A sample
with at least two *effective* ExANs (non-zero backward signal) at the last ReLU layer and at least one
at every other ReLU layer is reconstructable exactly from the averaged gradient (Pan et al., USENIX
Security 2022); a batch all of whose samples are is on the insecure side of the boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedleak.analysis.forward import forward_trace
from fedleak.errors import FedleakError, ModelError
from fedleak.models.structure import as_relu_mlp


@dataclass(frozen=True)
class LayerExclusivity:
    """ExAN statistics of one hidden ReLU layer for a batch of M samples."""

    name: str
    width: int
    active: np.ndarray  # (M,) number of active neurons per sample
    exans: np.ndarray  # (M,) exclusively activated neurons per sample
    effective_exans: np.ndarray  # (M,) ExANs whose backward signal is non-zero
    margin: np.ndarray  # (M,) exclusivity slack of the weakest ExAN the condition needs (0 if missing)
    dead_fraction: float  # neurons active for no sample
    shared_fraction: float  # neurons active for two or more samples

    def histogram(self, max_count: int = 10) -> np.ndarray:
        """Samples per ExAN count 0, 1, ..., ``max_count`` (the last bin holds ``>= max_count``)."""
        return np.bincount(np.minimum(self.effective_exans, max_count), minlength=max_count + 1)


@dataclass(frozen=True)
class ExclusivityReport:
    """Per-sample, per-layer exclusivity of a batch, and who is certifiably reconstructable."""

    layers: tuple[LayerExclusivity, ...]
    labels: np.ndarray
    certifiable: np.ndarray  # (M,) bool
    min_last: int
    min_other: int

    @property
    def batch_size(self) -> int:
        return int(self.labels.shape[0])

    @property
    def exan_counts(self) -> np.ndarray:
        """(M, H) effective ExAN counts."""
        return np.stack([layer.effective_exans for layer in self.layers], axis=1)

    @property
    def insecure(self) -> bool:
        """True when every sample meets the condition (the batch is provably reconstructable)."""
        return bool(self.certifiable.all())

    @property
    def certifiable_fraction(self) -> float:
        return float(self.certifiable.mean())

    def summary(self) -> str:
        counts = self.exan_counts
        per_layer = ", ".join(
            f"{layer.name}: min {int(c.min())} / median {float(np.median(c)):g} ExANs"
            for layer, c in zip(self.layers, counts.T)
        )
        verdict = "insecure (every sample reconstructable)" if self.insecure else "not fully reconstructable"
        return (
            f"{int(self.certifiable.sum())}/{self.batch_size} samples certifiable; batch {verdict}; {per_layer}"
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "batch_size": self.batch_size,
            "certifiable": self.certifiable.tolist(),
            "certifiable_fraction": self.certifiable_fraction,
            "insecure": self.insecure,
            "condition": {"min_exans_last_layer": self.min_last, "min_exans_other_layers": self.min_other},
            "layers": [
                {
                    "name": layer.name,
                    "width": layer.width,
                    "active": layer.active.tolist(),
                    "exans": layer.exans.tolist(),
                    "effective_exans": layer.effective_exans.tolist(),
                    "margin": layer.margin.tolist(),
                    "dead_fraction": layer.dead_fraction,
                    "shared_fraction": layer.shared_fraction,
                }
                for layer in self.layers
            ],
        }


def _kth_largest(values: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, the k-th largest of ``values`` where ``mask`` holds (0 where fewer than k)."""
    filled = torch.where(mask, values, torch.full_like(values, -torch.inf))
    if k > filled.shape[1]:
        return torch.zeros(filled.shape[0], dtype=values.dtype)
    top = torch.topk(filled, k, dim=1).values[:, k - 1]
    return torch.where(torch.isfinite(top), top, torch.zeros_like(top))


def analyze_exclusivity(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    min_last: int = 2,
    min_other: int = 1,
) -> ExclusivityReport:
    """Count, per sample and ReLU layer, the exclusively activated neurons of a batch.

    Activation patterns are computed in the model's own dtype, exactly as the client computes them.
    ``labels`` fix the backward signal that decides whether an ExAN is effective; without them the
    model's predictions are used. A sample is *certifiable* when it has at least ``min_last`` effective
    ExANs at the last ReLU layer and ``min_other`` at every other one. CNNs are analysed at unit and
    channel level (:func:`fedleak.analysis.conv_exclusivity.analyze_conv_exclusivity`).
    """
    from fedleak.models.convnet import is_cnn

    if is_cnn(model):  # unit- and channel-level analysis through the conv layers
        from fedleak.analysis.conv_exclusivity import analyze_conv_exclusivity

        return analyze_conv_exclusivity(model, inputs, labels, min_last=min_last, min_other=min_other)
    net = as_relu_mlp(model)
    if net.depth == 0:
        raise ModelError("the model has no hidden ReLU layer, so exclusivity is undefined")
    if not isinstance(inputs, torch.Tensor) or inputs.ndim < 2 or inputs.shape[0] == 0:
        raise FedleakError("inputs must be a non-empty batch tensor (M x ...)")
    if inputs[0].numel() != net.input_dim:
        raise FedleakError(
            f"each input has {inputs[0].numel()} values but the model's first layer takes {net.input_dim}"
        )
    if not torch.isfinite(inputs).all():
        raise FedleakError("the inputs hold NaN or inf values")
    dtype = net.dense[0].module.weight.dtype
    with torch.no_grad():
        if labels is None:
            labels = forward_trace(net, inputs, dtype=dtype).logits.argmax(1)
        labels = torch.as_tensor(labels).long().reshape(-1)
        if labels.shape[0] != inputs.shape[0]:
            raise FedleakError(f"{inputs.shape[0]} inputs but {labels.shape[0]} labels")
        if labels.min() < 0 or labels.max() >= net.num_classes:
            raise FedleakError(f"labels must lie in [0, {net.num_classes - 1}]")
        trace = forward_trace(net, inputs, labels, dtype=dtype)
    layers = []
    M = inputs.shape[0]
    counts_ok = torch.ones(M, dtype=torch.bool)
    for h, (z, delta) in enumerate(zip(trace.preactivations, trace.deltas)):
        active = z > 0
        per_neuron = active.sum(0)
        exclusive = active & (per_neuron == 1)
        effective = exclusive & (delta != 0)
        need = min_last if h == net.depth - 1 else min_other
        # slack: how far the neuron is from losing exclusivity (own activation vs. the others' highest)
        if M > 1:
            top2 = torch.topk(z, 2, dim=0).values
            others_max = torch.where(z >= top2[0], top2[1], top2[0])
        else:
            others_max = torch.full_like(z, -torch.inf)
        slack = torch.minimum(z, -others_max).to(torch.float64)
        margin = _kth_largest(slack, effective, need) if need > 0 else torch.zeros(M, dtype=torch.float64)
        layers.append(
            LayerExclusivity(
                name=net.dense[h].name,
                width=int(z.shape[1]),
                active=active.sum(1).numpy(),
                exans=exclusive.sum(1).numpy(),
                effective_exans=effective.sum(1).numpy(),
                margin=margin.numpy(),
                dead_fraction=float((per_neuron == 0).float().mean()),
                shared_fraction=float((per_neuron >= 2).float().mean()),
            )
        )
        counts_ok &= effective.sum(1) >= need
    return ExclusivityReport(
        layers=tuple(layers), labels=labels.numpy(), certifiable=counts_ok.numpy(), min_last=min_last, min_other=min_other
    )
