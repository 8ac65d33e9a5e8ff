"""A membership experiment on real data: train a target on some records (the members), hold out others (the
non-members), give the attacker a disjoint reference set for its shadow models, run each attack, and score it
(:func:`run_membership`).

The target's whole training is also what a federated client that trains on its data for all its local epochs in
one round would send: the experiment hands attacks that read an update the client's
:class:`~fedleak.updates.WeightUpdate` from the target's initial weights to its trained ones.
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass, field

import torch

from fedleak.autograd_mode import with_autograd
from fedleak.data import load_dataset
from fedleak.defenses.base import Privacy
from fedleak.errors import OptionError
from fedleak.membership.base import MembershipAttack, Observation, Records, Reference, parse_membership_attack
from fedleak.membership.metrics import MembershipMetrics, score_membership
from fedleak.membership.signals import record_logits
from fedleak.membership.training import TrainingRecipe
from fedleak.option_fields import validate_fields
from fedleak.updates import WeightUpdate
from fedleak.validation import check_distinct, check_seed

DEFAULT_ATTACKS = ("loss", "confidence", "gradient-norm", "whitebox", "whitebox-unsupervised", "lira")


@dataclass(frozen=True)
class MembershipSettings:
    """One experiment: the built-in data set ``data``; ``members`` records the target trains on,
    ``non_members`` held-out records, ``reference`` further records the attacker trains its shadow models on
    (each on ``members`` of them drawn at random, or on half when there are no more than ``members``), all
    disjoint and drawn at random from ``seed``; the target's training (an MLP of
    hidden ``widths``, or the user's ``model`` spec starting from ``weights`` when given, see
    :class:`~fedleak.membership.training.TrainingRecipe`; ``epochs`` of SGD at ``lr`` in mini-batches of
    ``batch_size``, each step through ``defense``); and the ``attacks`` (names, specs ``"name:key=value,..."``, or
    attacks built with options; each is named in the results by its label, its name and the options it changes)."""

    data: str = "fashion-mnist-train"
    members: int = 500
    non_members: int = 1000
    reference: int = 1000
    widths: tuple[int, ...] = (256,)
    epochs: int = 100
    batch_size: int = 50
    lr: float = field(default=0.1, metadata={"low": 1e-12})
    defense: str = "none"
    attacks: tuple[MembershipAttack | str, ...] = DEFAULT_ATTACKS
    seed: int = 0
    model: str | None = None
    weights: str | None = None

    def __post_init__(self) -> None:
        validate_fields(self)
        check_seed("seed", self.seed)
        for name in ("members", "non_members", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise OptionError(f"{name} must be at least 1, got {getattr(self, name)}")
        attacks = tuple(parse_membership_attack(a) for a in self.attacks)
        if not attacks:
            raise OptionError("give at least one membership attack")
        check_distinct([a.label for a in attacks], "membership attack(s)", error=OptionError)
        if self.reference < 2 and any("shadow" in a.needs for a in attacks):
            raise OptionError(f"attacks that train on shadow models need reference records; reference="
                              f"{self.reference}")
        object.__setattr__(self, "attacks", attacks)
        object.__setattr__(self, "widths", tuple(self.widths))

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "attacks"}
        out["attacks"] = [{"name": a.name, **a.params()} for a in self.attacks]  # type: ignore[union-attr]
        out["widths"] = list(self.widths)
        return out


@dataclass(frozen=True)
class AttackOutcome:
    """One attack's ``metrics`` with its ``name`` and options (``params``) and the ``seconds`` it took (fitting
    on shadow data included; the shadow models themselves are counted where they are first trained)."""

    name: str
    params: dict
    metrics: MembershipMetrics
    seconds: float

    def to_dict(self) -> dict:
        return {"name": self.name, "params": self.params, "seconds": self.seconds, **self.metrics.to_dict()}


@dataclass(frozen=True)
class MembershipResult:
    """What an experiment measured: the target's ``train_accuracy`` (on its members) and ``test_accuracy`` (on
    the held-out non-members), the ``privacy`` guarantees of its defense (none without DP), and each attack's
    outcome, in the order of the settings."""

    settings: MembershipSettings
    train_accuracy: float
    test_accuracy: float
    privacy: tuple[Privacy, ...]
    outcomes: tuple[AttackOutcome, ...]
    seconds: float

    @property
    def epsilon(self) -> float | None:
        """The smallest ε of the defense's guarantees, or None without one."""
        return min((p.epsilon for p in self.privacy), default=None)

    def metrics(self, name: str) -> MembershipMetrics:
        for outcome in self.outcomes:
            if outcome.name == name:
                return outcome.metrics
        raise OptionError(f"no attack '{name}' in this result; it has {[o.name for o in self.outcomes]}")

    def to_dict(self) -> dict:
        import fedleak

        return {"settings": self.settings.to_dict(), "train_accuracy": self.train_accuracy,
                "test_accuracy": self.test_accuracy, "epsilon": self.epsilon,
                "privacy": [p.to_dict() for p in self.privacy], "seconds": self.seconds,
                "versions": {"fedleak": fedleak.__version__, "torch": torch.__version__,
                             "python": platform.python_version()},
                "attacks": [o.to_dict() for o in self.outcomes]}


def accuracy(model: torch.nn.Module, records: Records) -> float:
    return float((record_logits(model, records).argmax(1) == records.labels).double().mean())


def draw_records(settings: MembershipSettings) -> tuple[Records, Records, Records | None]:
    """Members, non-members and reference records (None when ``reference`` is 0): disjoint random subsets."""
    data = load_dataset(settings.data)
    need = settings.members + settings.non_members + settings.reference
    if need > len(data.y):
        share = len(data.y) / need  # the same proportions, scaled down to what the data set holds
        fit = ", ".join(f"{name}={int(getattr(settings, name) * share)}"
                        for name in ("members", "non_members", "reference") if getattr(settings, name))
        raise OptionError(f"members + non_members + reference = {need:,} records, but '{settings.data}' holds "
                          f"{len(data.y):,}; ask for fewer ({fit} fit)")
    order = torch.randperm(len(data.y), generator=torch.Generator().manual_seed(settings.seed))
    cuts = torch.tensor([settings.members, settings.non_members, settings.reference]).cumsum(0).tolist()
    pick = [order[:cuts[0]], order[cuts[0]:cuts[1]], order[cuts[1]:cuts[2]]]
    reference = Records(data.x[pick[2]], data.y[pick[2]]) if settings.reference else None
    return Records(data.x[pick[0]], data.y[pick[0]]), Records(data.x[pick[1]], data.y[pick[1]]), reference


@with_autograd
def run_membership(settings: MembershipSettings | None = None) -> MembershipResult:
    """Run one membership experiment (see :class:`MembershipSettings`) and score every attack."""
    settings = settings or MembershipSettings()
    start = time.perf_counter()
    members, non_members, reference_records = draw_records(settings)
    data = load_dataset(settings.data)
    recipe = TrainingRecipe(tuple(data.input_shape), data.num_classes, widths=settings.widths,
                            epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr,
                            defense=settings.defense, model=settings.model, weights=settings.weights,
                            data_range=data.value_range)
    initial = recipe.build(settings.seed)
    target = recipe.train(members, settings.seed)
    update = WeightUpdate({k: v.detach() for k, v in initial.state_dict().items()},
                          {k: v.detach() for k, v in target.state_dict().items()}, num_examples=len(members))
    observation = Observation(target, update=update, num_classes=recipe.num_classes)
    shadow_size = settings.members if settings.reference > settings.members else None
    reference = (Reference(reference_records, recipe.train, seed=settings.seed + 1, shadow_size=shadow_size)
                 if reference_records is not None else None)
    candidates = Records(torch.cat([members.inputs, non_members.inputs]),
                         torch.cat([members.labels, non_members.labels]))
    truth = torch.cat([torch.ones(len(members)), torch.zeros(len(non_members))]).bool()
    outcomes = []
    for attack in settings.attacks:
        assert isinstance(attack, MembershipAttack)
        began = time.perf_counter()
        fitted = attack.fit(reference) if reference is not None and "shadow" in attack.needs else attack
        scores = fitted.score(observation, candidates)
        outcomes.append(AttackOutcome(attack.label, attack.params(), score_membership(scores, truth),
                                      time.perf_counter() - began))
    return MembershipResult(settings, accuracy(target, members), accuracy(target, non_members),
                            recipe.privacy(len(members)), tuple(outcomes), time.perf_counter() - start)
