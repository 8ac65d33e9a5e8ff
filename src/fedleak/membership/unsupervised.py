"""The unsupervised white-box attack of Nasr, Shokri and Houmansadr (IEEE S&P 2019): no membership labels at all.

An auto-encoder is trained on the candidates' own white-box features under the target model: its encoder is the
attack model of :mod:`fedleak.membership.nasr` with a one-number output, its decoder rebuilds every feature from
that number. The number is the membership score; as in the paper, the candidates are then split into two
clusters on it (1-D 2-means, exact), and the cluster whose records have the lower mean loss is called the
members, which fixes the score's sign.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from fedleak.errors import OptionError
from fedleak.membership.base import MembershipAttack, Observation, Records, check_same_length
from fedleak.membership.features import whitebox_features
from fedleak.membership.nasr import FeatureScaler, NasrAttackModel, batches
from fedleak.membership.registry import register_membership_attack
from fedleak.membership.signals import record_logits


def two_means(values: np.ndarray) -> float:
    """The threshold of the exact 1-D 2-means split of ``values`` (least within-cluster squared error)."""
    ordered = np.sort(values)
    n = ordered.size
    csum, csq = np.cumsum(ordered), np.cumsum(ordered ** 2)
    left = np.arange(1, n)
    sse_left = csq[:-1] - csum[:-1] ** 2 / left
    sse_right = (csq[-1] - csq[:-1]) - (csum[-1] - csum[:-1]) ** 2 / (n - left)
    cut = int(np.argmin(sse_left + sse_right))
    return float((ordered[cut] + ordered[cut + 1]) / 2)


@register_membership_attack
@dataclass(frozen=True)
class UnsupervisedWhiteboxAttack(MembershipAttack):
    """Options: ``layers``, ``epochs``, ``lr``, ``width``, ``filters`` of the auto-encoder, ``seed``."""

    name: ClassVar[str] = "whitebox-unsupervised"
    summary: ClassVar[str] = "auto-encoder on the candidates' white-box features, scored and clustered, no labels"
    source: ClassVar[str] = "Nasr, Shokri & Houmansadr, IEEE S&P 2019 (passive, unsupervised)"
    needs: ClassVar[frozenset[str]] = frozenset({"model"})

    layers: int = 1
    epochs: int = 40
    lr: float = field(default=1e-3, metadata={"low": 1e-12})
    width: int = 64
    filters: int = 8
    seed: int = 0

    def check(self) -> None:
        for name in ("layers", "epochs", "width", "filters"):
            if getattr(self, name) < 1:
                raise OptionError(f"option {name} of {self.name} must be at least 1, got {getattr(self, name)}")

    def score(self, observation: Observation, records: Records) -> torch.Tensor:
        self.require(observation)
        if len(records) < 4:
            raise OptionError(f"{self.name} clusters the candidates: give at least 4 records, got {len(records)}")
        features = whitebox_features(observation.model, records, self.layers)
        classes = int(record_logits(observation.model, records.take(torch.arange(1))).shape[1])
        inputs = FeatureScaler.fit(features, classes).apply(features)
        target = inputs.flat()
        gen = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
        encoder = NasrAttackModel(inputs, width=self.width, filters=self.filters)
        decoder = nn.Sequential(nn.Linear(1, self.width), nn.ReLU(), nn.Linear(self.width, target.shape[1]))
        optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=self.lr)
        for _ in range(self.epochs):
            encoder.train()
            for idx in batches(len(records), 128, gen):
                optimizer.zero_grad()
                code = encoder(inputs.take(idx)).unsqueeze(1)
                nn.functional.mse_loss(decoder(code), target[idx]).backward()
                optimizer.step()
        encoder.eval()
        with torch.no_grad():
            code = encoder(inputs).double()
        values = code.numpy()
        upper = values > two_means(values)
        loss = features.loss.numpy()
        members_above = upper.any() and (~upper).any() and loss[upper].mean() < loss[~upper].mean()
        return check_same_length(code if members_above else -code, records, self.name)
