"""The attack model of Nasr, Shokri and Houmansadr (IEEE S&P 2019), in a reduced but faithful form.

One component per feature, each a small network, their outputs concatenated and fed to an encoder that outputs
one membership logit:

* per weighted layer, the record's weight gradient (out x in) goes through a convolution whose kernel spans a
  whole row (1 x in), as in the paper, with ``filters`` filters instead of the paper's 1,000, then a
  fully connected layer;
* gradient rows and hidden activations are sorted by magnitude first
  (:meth:`~fedleak.membership.features.WhiteboxFeatures.unit_invariant`): a shadow model's hidden units are in
  another order than the target's, and an attack model trained on raw rows does not carry over (measured: AUC
  0.51 on the target for 0.72 on held-out shadow data);
* per activation (the last layers' inputs and outputs), a fully connected layer;
* the loss component takes ``log(loss)`` and, beside it, ``log`` of each layer's gradient norm (an addition: the
  norm is what the paper's own analysis separates members by, and a small network does not learn a norm from
  raw entries easily);
* the label component takes the one-hot true label.

:class:`FeatureScaler` puts the features on a common scale, from statistics of the data it is fitted on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedleak.membership.features import WhiteboxFeatures

TINY = 1e-12


@dataclass(frozen=True)
class Scale:
    mean: torch.Tensor
    std: torch.Tensor

    @staticmethod
    def of(values: torch.Tensor) -> Scale:
        return Scale(values.mean(0), values.std(0).clamp_min(1e-6) if values.shape[0] > 1 else
                     torch.ones_like(values[0]))

    def apply(self, values: torch.Tensor) -> torch.Tensor:
        return (values - self.mean) / self.std


@dataclass(frozen=True)
class ScaledFeatures:
    """Network-ready float32 inputs: ``gradients`` N x 1 x out x in, ``activations`` N x d, ``loss`` N x (1 + L),
    ``labels`` N x K one-hot."""

    gradients: tuple[torch.Tensor, ...]
    activations: tuple[torch.Tensor, ...]
    loss: torch.Tensor
    labels: torch.Tensor

    def take(self, index: torch.Tensor) -> ScaledFeatures:
        return ScaledFeatures(tuple(g[index] for g in self.gradients), tuple(a[index] for a in self.activations),
                              self.loss[index], self.labels[index])

    def flat(self) -> torch.Tensor:
        """Every input as one N x D row (what the auto-encoder reconstructs)."""
        return torch.cat([g.flatten(1) for g in self.gradients] + list(self.activations) + [self.loss, self.labels],
                         dim=1)


def loss_inputs(features: WhiteboxFeatures) -> torch.Tensor:
    return torch.cat([torch.log(features.loss.clamp_min(0) + TINY).unsqueeze(1),
                      torch.log(features.gradient_norms() + TINY)], dim=1)


@dataclass(frozen=True)
class FeatureScaler:
    """Per-layer gradient RMS, per-dimension activation and loss-component mean and std, and the number of
    classes, fitted on one set of features and applied to any."""

    gradient_rms: tuple[float, ...]
    activations: tuple[Scale, ...]
    loss: Scale
    num_classes: int

    @staticmethod
    def fit(features: WhiteboxFeatures, num_classes: int) -> FeatureScaler:
        features = features.unit_invariant()
        return FeatureScaler(
            tuple(max(float(g.pow(2).mean().sqrt()), 1e-12) for g in features.gradients),
            tuple(Scale.of(a) for a in features.activations), Scale.of(loss_inputs(features)), num_classes)

    def apply(self, features: WhiteboxFeatures) -> ScaledFeatures:
        features = features.unit_invariant()
        return ScaledFeatures(
            tuple((g / rms).unsqueeze(1).float() for g, rms in zip(features.gradients, self.gradient_rms)),
            tuple(s.apply(a).float() for s, a in zip(self.activations, features.activations)),
            self.loss.apply(loss_inputs(features)).float(),
            nn.functional.one_hot(features.labels, self.num_classes).float())


def _block(inputs: int, width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, width), nn.ReLU(), nn.Linear(width, width // 2), nn.ReLU())


class NasrAttackModel(nn.Module):
    """The attack model: per-feature components, concatenated, then an encoder to one logit per record."""

    def __init__(self, example: ScaledFeatures, width: int = 64, filters: int = 8) -> None:
        super().__init__()
        self.gradients = nn.ModuleList(
            nn.Sequential(nn.Conv2d(1, filters, kernel_size=(1, g.shape[3])), nn.ReLU(), nn.Flatten(),
                          nn.Dropout(0.2), _block(filters * g.shape[2], width))
            for g in example.gradients)
        self.activations = nn.ModuleList(_block(a.shape[1], width) for a in example.activations)
        self.loss = _block(example.loss.shape[1], width)
        self.labels = _block(example.labels.shape[1], width)
        parts = len(self.gradients) + len(self.activations) + 2
        self.encoder = nn.Sequential(nn.Linear(parts * (width // 2), width), nn.ReLU(), nn.Linear(width, width // 2),
                                     nn.ReLU(), nn.Linear(width // 2, 1))

    def forward(self, x: ScaledFeatures) -> torch.Tensor:
        parts = [c(g) for c, g in zip(self.gradients, x.gradients)]
        parts += [c(a) for c, a in zip(self.activations, x.activations)]
        parts += [self.loss(x.loss), self.labels(x.labels)]
        return self.encoder(torch.cat(parts, dim=1)).squeeze(1)


def batches(size: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    order = torch.randperm(size, generator=gen)
    return [order[i:i + batch_size] for i in range(0, size, batch_size)]
