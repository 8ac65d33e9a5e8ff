"""The membership audit: train a target on some records of the audited data, hold others out, and measure how
well each membership attack tells them apart, for an honest client and for each client defense.

One scenario per training: ``plain`` (no defense) and one per defense spec
(``"dp-sgd:noise_multiplier=1.0,max_grad_norm=1.0"``, named by its stack's label, as in the reconstruction audit).
Each scenario is one :func:`fedleak.membership.run_membership` experiment on the built-in data or the user's data
(a path). A user's model (``settings.model``: a built-in name or ``path/to/file.py:Class``, optionally starting
from ``weights``) is trained by :class:`~fedleak.membership.TrainingRecipe` like its MLP and attacked by the same
attacks.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from fedleak.audit.scenarios import defense_label
from fedleak.errors import OptionError
from fedleak.membership.base import parse_membership_attack
from fedleak.membership.catalog import CHEAP_ATTACKS
from fedleak.membership.experiment import MembershipResult, MembershipSettings, run_membership
from fedleak.option_fields import validate_fields
from fedleak.validation import check_distinct, check_seed

PLAIN = "plain"


@dataclass(frozen=True)
class MembershipAuditSettings:
    """What a membership audit runs.

    ``data``: a built-in data set or a path to the user's data; ``model``: None for an MLP of hidden ``widths``,
    else a model spec (:func:`fedleak.models.zoo.load_model`: a built-in name or ``path/to/file.py:Class``)
    whose training starts from ``weights`` when given (the global model a client receives), else from a
    seeded initialisation. ``members`` records train the target, ``non_members`` are held out, ``reference``
    records are the attacker's for shadow models (None: ``members`` of them when an attack trains shadows, else
    none); the target trains ``epochs`` of SGD at ``lr`` on mini-batches of ``batch_size``. ``defenses``: defense
    specs, each one more scenario next to ``plain``; ``attacks``: membership attacks, each a name or a spec
    ``"name:key=value,..."`` (``"augmented-loss:padding=4"``).
    """

    data: str = "digits"
    model: str | None = None
    weights: str | None = None
    widths: tuple[int, ...] = (1024,)
    members: int = 500
    non_members: int = 500
    reference: int | None = None
    epochs: int = 30
    batch_size: int = 50
    lr: float = field(default=0.1, metadata={"low": 1e-12})
    defenses: tuple[str, ...] = ()
    attacks: tuple[str, ...] = CHEAP_ATTACKS
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("widths", "defenses", "attacks"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        validate_fields(self)
        check_seed("seed", self.seed)
        if not self.attacks:
            raise OptionError("give at least one membership attack")
        if self.weights is not None and self.model is None:
            raise OptionError("weights need a model: give the model they belong to as well")
        labels = [PLAIN] + [defense_label(spec) for spec in self.defenses]  # OptionError for a bad defense
        check_distinct(labels, "scenario(s)", error=OptionError)
        self.experiment("none")  # every option checked (attack names, counts) before anything trains

    @property
    def scenario_names(self) -> tuple[str, ...]:
        return (PLAIN,) + tuple(defense_label(spec) for spec in self.defenses)

    def experiment(self, defense: str) -> MembershipSettings:
        """The experiment of one scenario: these settings with the target trained through ``defense``."""
        attacks = tuple(parse_membership_attack(spec) for spec in self.attacks)
        shadows = any("shadow" in a.needs for a in attacks)
        reference = self.reference if self.reference is not None else (self.members if shadows else 0)
        return MembershipSettings(
            data=self.data, members=self.members, non_members=self.non_members, reference=reference,
            widths=self.widths, epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, defense=defense,
            attacks=attacks, seed=self.seed, model=self.model, weights=self.weights)

    def to_dict(self) -> dict[str, object]:
        out = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


@dataclass(frozen=True)
class MembershipScenario:
    """One audited scenario: its ``name`` (``plain`` or a defense stack's label), the defense ``spec`` its
    target was trained through (``"none"`` for plain) and what the experiment measured."""

    name: str
    spec: str
    result: MembershipResult

    @property
    def accuracy_gap(self) -> float:
        return self.result.train_accuracy - self.result.test_accuracy


@dataclass(frozen=True)
class MembershipAudit:
    settings: MembershipAuditSettings
    scenarios: tuple[MembershipScenario, ...]
    model: str  # what was trained: "MLP 64-1024-10" or the user's model spec
    seconds: float


def run_membership_audit(settings: MembershipAuditSettings) -> MembershipAudit:
    """Run every scenario of ``settings`` (plain, then each defense) and return what each measured."""
    start = time.perf_counter()
    scenarios = []
    for name, spec in zip(settings.scenario_names, ("none",) + settings.defenses):
        experiment = settings.experiment(spec)
        scenarios.append(MembershipScenario(name, spec, run_membership(experiment)))
    return MembershipAudit(settings, tuple(scenarios), _model_text(settings), time.perf_counter() - start)


def _model_text(settings: MembershipAuditSettings) -> str:
    if settings.model is not None:
        return settings.model + (f" from {settings.weights}" if settings.weights else "")
    return "MLP, hidden " + "-".join(str(w) for w in settings.widths)
