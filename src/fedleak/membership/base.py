"""What a membership attack is: what the attacker observes, which records it scores, and the one interface every
attack implements.

* :class:`Records`: the candidate records (inputs and labels) whose membership is in question;
* :class:`Observation`: what the attacker sees of the target: the trained (or global) model, optionally one
  client's update, optionally a sequence of federated rounds;
* :class:`Reference`: what an attacker that calibrates has: its own data from the target's distribution, disjoint
  from the candidates, and a recipe that trains a model the way the target was trained (shadow models);
* :class:`MembershipAttack`: a frozen dataclass of options; ``score(observation, records)`` returns one float per
  record, higher meaning more likely a member; ``fit(reference)`` returns a copy trained on shadow data (or the
  attack itself when it has nothing to fit).

Attacks are registered by name (:func:`~fedleak.membership.registry.register_membership_attack`) and built with
:func:`make_membership_attack`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from fedleak.errors import FedleakError, OptionError
from fedleak.membership.registry import membership_attack_class
from fedleak.option_fields import options_from, validate_fields
from fedleak.specs import parse_spec, spec_label
from fedleak.updates import ClientUpdate, GradientUpdate, WeightUpdate
from fedleak.validation import all_finite, check_int, check_seed


@dataclass(frozen=True)
class Records:
    """Candidate records: ``inputs`` (N x ...) and integer ``labels`` (N), both tensors of the same length."""

    inputs: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.inputs, torch.Tensor) or not isinstance(self.labels, torch.Tensor):
            raise FedleakError("Records needs torch tensors: inputs (N x ...) and labels (N)")
        if self.labels.ndim != 1 or self.inputs.shape[0] != self.labels.shape[0]:
            raise FedleakError(f"Records: inputs hold {self.inputs.shape[0] if self.inputs.ndim else 0} record(s) "
                               f"but labels have shape {tuple(self.labels.shape)}; give one label per input")
        if self.labels.is_floating_point() or self.labels.dtype == torch.bool:
            raise FedleakError(f"Records: labels must be integer class indices, got {self.labels.dtype}")
        if self.inputs.shape[0] == 0:
            raise FedleakError("Records: no records given")
        if not all_finite(self.inputs):
            raise FedleakError("Records: inputs hold NaN or infinite values")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, index: torch.Tensor) -> Records:
        """The records at ``index`` (a 1-D index tensor or boolean mask)."""
        return Records(self.inputs[index], self.labels[index])



@dataclass(frozen=True)
class Round:
    """One federated round as an attacker sees it: ``model`` at the weights the server sent, and the client's
    ``update`` against them (a gradient, or weights before/after local training)."""

    model: nn.Module
    update: ClientUpdate


@dataclass(frozen=True)
class Observation:
    """What the attacker sees of the target.

    ``model``: the trained model (centralised) or the global model after training (federated), in eval use;
    ``update``: one client's update (a :class:`~fedleak.updates.WeightUpdate` holds the weights the server sent
    as ``before``; for a :class:`~fedleak.updates.GradientUpdate`, ``model`` is taken to hold the sent weights);
    ``rounds``: the client's updates over several rounds, oldest first, for attacks over rounds;
    ``num_classes``: the number of classes (read from the model's output when None).
    """

    model: nn.Module
    update: ClientUpdate | None = None
    rounds: tuple[Round, ...] = ()
    num_classes: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise FedleakError(f"Observation.model must be a torch.nn.Module, got {type(self.model).__name__}")
        if self.update is not None and not isinstance(self.update, (GradientUpdate, WeightUpdate)):
            raise FedleakError("Observation.update must be a fedleak.GradientUpdate or fedleak.WeightUpdate, got "
                               f"{type(self.update).__name__}")
        object.__setattr__(self, "rounds", tuple(self.rounds))
        for i, item in enumerate(self.rounds):
            if not isinstance(item, Round):
                raise FedleakError(f"Observation.rounds[{i}] must be a fedleak.membership.Round, "
                                   f"got {type(item).__name__}")


Trainer = Callable[[Records, int], nn.Module]
"""``train(records, seed) -> model``: trains a fresh model on ``records`` the way the target was trained."""


@dataclass(frozen=True)
class ShadowModel:
    """A model trained by :attr:`Reference.train` on the reference records at ``members`` (indices); the other
    reference records are its non-members."""

    model: nn.Module
    members: torch.Tensor
    non_members: torch.Tensor


@dataclass(frozen=True)
class Reference:
    """What a calibrating attacker has: ``records`` from the target's distribution that are not candidates, a
    ``train`` recipe that trains a fresh model on some records as the target was trained, a ``seed`` for
    the attacker's own random choices (which records each shadow model trains on), and ``shadow_size``, the
    records each shadow model trains on (the target's training-set size, ideally; None: half the reference
    records). The reference records a shadow does not train on are its non-members."""

    records: Records
    train: Trainer
    seed: int = 0
    shadow_size: int | None = None

    def __post_init__(self) -> None:
        if self.shadow_size is not None:
            check_int("Reference.shadow_size", self.shadow_size, low=1, high=max(len(self.records) - 1, 1),
                      error=OptionError)
        if not isinstance(self.records, Records):
            raise FedleakError("Reference.records must be fedleak.membership.Records")
        if not callable(self.train):
            raise FedleakError("Reference.train must be a callable train(records, seed) -> nn.Module")
        check_seed("Reference.seed", self.seed)
        object.__setattr__(self, "_shadows", {})

    def shadow(self, index: int) -> ShadowModel:
        """Shadow model ``index`` (0, 1, ...): trained on a random half of the reference records drawn from
        ``seed + index``; trained once and kept, so attacks fitted on one reference share their shadow models."""
        index = check_int("shadow index", index, low=0, high=10_000, error=OptionError)
        shadows: dict[int, ShadowModel] = self._shadows  # type: ignore[attr-defined]
        if index not in shadows:
            members, non_members = self.split(self.seed + index)
            model = self.train(self.records.take(members), self.seed + index)
            if not isinstance(model, nn.Module):
                raise FedleakError(f"Reference.train returned a {type(model).__name__}, not a torch.nn.Module")
            shadows[index] = ShadowModel(model, members, non_members)
        return shadows[index]

    def split(self, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Random ``shadow_size`` (or half) of the reference records' indices and the rest (shadow members,
        shadow non-members)."""
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.records), generator=gen)
        half = self.shadow_size if self.shadow_size is not None else len(self.records) // 2
        return order[:half].sort().values, order[half:].sort().values


@dataclass(frozen=True)
class MembershipAttack:
    """Base of every membership attack: a frozen dataclass of options with a name, a summary, a source and
    ``needs``, what the attack reads: ``"model"`` (the trained model), ``"update"`` (a client's update),
    ``"rounds"`` (updates over rounds), ``"shadow"`` (a :class:`Reference` given to :meth:`fit`)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    source: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset({"model"})

    def __post_init__(self) -> None:
        validate_fields(self)
        self.check()

    def check(self) -> None:
        """Checks beyond :func:`~fedleak.option_fields.validate_fields`; raise OptionError."""

    def params(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    @property
    def label(self) -> str:
        """``name(key=value, ...)`` with the options that differ from their defaults: the attack's name in results."""
        return spec_label(self.name, self)

    @property
    def fitted(self) -> bool:
        """Whether the attack can score: True for attacks with nothing to fit."""
        return "shadow" not in self.needs

    def fit(self, reference: Reference) -> MembershipAttack:
        """A copy of this attack trained on ``reference`` (shadow models); the attack itself if it fits nothing."""
        return self

    def score(self, observation: Observation, records: Records) -> torch.Tensor:
        """One float per record (a 1-D float tensor of ``len(records)``), higher meaning more likely a member."""
        raise NotImplementedError

    def require(self, observation: Observation) -> None:
        """Raise FedleakError unless ``observation`` holds what this attack reads (and it is fitted if it must be)."""
        if "update" in self.needs and observation.update is None:
            raise FedleakError(f"membership attack '{self.name}' reads a client's update: give Observation(update=...)")
        if "rounds" in self.needs and not observation.rounds:
            raise FedleakError(f"membership attack '{self.name}' reads the client's rounds: give "
                               "Observation(rounds=...)")
        if not self.fitted:
            raise FedleakError(f"membership attack '{self.name}' trains on shadow data first: call "
                               ".fit(reference) and score with the attack it returns")


def make_membership_attack(name: str, **options: object) -> MembershipAttack:
    """The membership attack registered as ``name``, built with ``options`` (OptionError for an unknown name or
    option, or a bad value)."""
    cls = membership_attack_class(name)
    return options_from(cls, options, error=OptionError, what=f"{name} option")


def parse_membership_attack(spec: str | MembershipAttack) -> MembershipAttack:
    """A membership attack from ``"name"`` or ``"name:key=value,key=value"`` (``"augmented-loss:padding=4"``; values
    converted to the option's type, :func:`~fedleak.specs.parse_spec`), or the attack itself."""
    if isinstance(spec, MembershipAttack):
        return spec
    name, options = parse_spec(spec, "membership attack", membership_attack_class)
    return make_membership_attack(name, **options)


def check_same_length(scores: torch.Tensor, records: Records, name: str) -> torch.Tensor:
    """``scores`` as a detached float64 1-D tensor, checked to hold one finite value per record."""
    out = scores.detach().to(torch.float64).reshape(-1)
    if out.shape[0] != len(records):
        raise RuntimeError(f"membership attack '{name}' returned {out.shape[0]} scores for {len(records)} records")
    return torch.nan_to_num(out, nan=0.0, posinf=1e300, neginf=-1e300)
