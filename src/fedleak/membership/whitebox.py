"""The passive white-box attack of Nasr, Shokri and Houmansadr (IEEE S&P 2019), supervised: shadow models trained
like the target on the attacker's own data give white-box features of records whose membership the attacker
knows; the attack model (:mod:`fedleak.membership.nasr`) learns members from non-members on them, then scores
the target's records. A fifth of the shadow records is held out to pick the training epoch."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from fedleak.errors import FedleakError, OptionError
from fedleak.membership.base import MembershipAttack, Observation, Records, Reference, check_same_length
from fedleak.membership.features import WhiteboxFeatures, whitebox_features
from fedleak.membership.metrics import mann_whitney_auc
from fedleak.membership.nasr import FeatureScaler, NasrAttackModel, batches
from fedleak.membership.registry import register_membership_attack
from fedleak.membership.signals import record_logits


@dataclass(frozen=True)
class TrainedWhitebox:
    """A fitted attack model with the scaler of its inputs and the held-out AUC it reached on shadow data."""

    network: NasrAttackModel
    scaler: FeatureScaler
    validation_auc: float


def shadow_features(reference: Reference, shadows: int, layers: int) -> tuple[WhiteboxFeatures, torch.Tensor]:
    """White-box features of every reference record under each shadow model, and whether it was a member."""
    parts, truth = [], []
    for index in range(shadows):
        shadow = reference.shadow(index)
        parts.append(whitebox_features(shadow.model, reference.records, layers))
        member = torch.zeros(len(reference.records), dtype=torch.bool)
        member[shadow.members] = True
        truth.append(member)
    return WhiteboxFeatures.concat(parts), torch.cat(truth)


def num_classes_of(model: torch.nn.Module, records: Records) -> int:
    return int(record_logits(model, records.take(torch.arange(1))).shape[1])


@register_membership_attack
@dataclass(frozen=True)
class WhiteboxAttack(MembershipAttack):
    """Options: ``layers`` last weighted layers whose gradients and activations are read, ``shadows`` shadow
    models, ``epochs`` / ``lr`` / ``width`` / ``filters`` of the attack model, ``seed``."""

    name: ClassVar[str] = "whitebox"
    summary: ClassVar[str] = "attack model on per-layer gradients, activations, loss and label, trained on shadows"
    source: ClassVar[str] = "Nasr, Shokri & Houmansadr, IEEE S&P 2019 (passive, supervised)"
    needs: ClassVar[frozenset[str]] = frozenset({"model", "shadow"})

    layers: int = 1
    shadows: int = 1
    epochs: int = 60
    lr: float = field(default=1e-3, metadata={"low": 1e-12})
    width: int = 64
    filters: int = 8
    seed: int = 0
    trained: TrainedWhitebox | None = field(default=None, init=False, repr=False, compare=False)

    def check(self) -> None:
        for name in ("layers", "shadows", "epochs", "width", "filters"):
            if getattr(self, name) < 1:
                raise OptionError(f"option {name} of whitebox must be at least 1, got {getattr(self, name)}")

    @property
    def fitted(self) -> bool:
        return self.trained is not None

    def fit(self, reference: Reference) -> WhiteboxAttack:
        features, member = shadow_features(reference, self.shadows, self.layers)
        scaler = FeatureScaler.fit(features, num_classes_of(reference.shadow(0).model, reference.records))
        fitted = dataclasses.replace(self)
        object.__setattr__(fitted, "trained", train_attack_model(scaler, features, member, self))
        return fitted

    def score(self, observation: Observation, records: Records) -> torch.Tensor:
        self.require(observation)
        assert self.trained is not None
        features = whitebox_features(observation.model, records, self.layers)
        network = self.trained.network
        network.eval()
        with torch.no_grad():
            logits = network(self.trained.scaler.apply(features))
        return check_same_length(logits, records, self.name)


def train_attack_model(scaler: FeatureScaler, features: WhiteboxFeatures, member: torch.Tensor,
                       options: WhiteboxAttack) -> TrainedWhitebox:
    """Train the attack model on ``features`` labelled ``member``, keeping the epoch with the best AUC on a
    held-out fifth (checked every few epochs)."""
    if member.all() or not member.any():
        raise FedleakError("the shadow data hold only members or only non-members; give more reference records")
    gen = torch.Generator().manual_seed(options.seed)
    torch.manual_seed(options.seed)  # the attack model's initialisation
    order = torch.randperm(len(features), generator=gen)
    held = max(len(order) // 5, 2)
    valid, train = order[:held], order[held:]
    inputs = scaler.apply(features)
    fit_x, valid_x = inputs.take(train), inputs.take(valid)
    fit_y, valid_y = member[train].float(), member[valid].numpy()
    network = NasrAttackModel(fit_x, width=options.width, filters=options.filters)
    optimizer = torch.optim.Adam(network.parameters(), lr=options.lr, weight_decay=1e-4)
    best = (-1.0, copy.deepcopy(network.state_dict()))
    for epoch in range(options.epochs):
        network.train()
        for idx in batches(len(train), 128, gen):
            optimizer.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(network(fit_x.take(idx)), fit_y[idx])
            loss.backward()
            optimizer.step()
        if epoch % 5 == 4 or epoch == options.epochs - 1:
            network.eval()
            with torch.no_grad():
                scores = network(valid_x).double().numpy()
            auc = mann_whitney_auc(scores, valid_y) if 0 < valid_y.sum() < len(valid_y) else 0.5
            if auc > best[0]:
                best = (auc, copy.deepcopy(network.state_dict()))
    network.load_state_dict(best[1])
    network.eval()
    return TrainedWhitebox(network, scaler, best[0])
