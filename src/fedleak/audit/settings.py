"""What an audit runs (:class:`AuditSettings`): the data, the model, the batch sizes and trials, the attack, the
clients' scenarios and defenses, and the loss they train with, checked before anything runs."""

from __future__ import annotations

from dataclasses import dataclass

from fedleak.audit.scenarios import defense_label
from fedleak.client_loss import ClientLoss, check_loss_read
from fedleak.clients.mode import check_client_mode
from fedleak.defenses.stack import DefenseStack
from fedleak.errors import FedleakError
from fedleak.option_fields import validate_fields
from fedleak.validation import check_distinct


@dataclass(frozen=True)
class AuditSettings:
    """What an audit runs. ``data`` is a built-in data set name or a path to the user's data.

    ``scenarios``: registered scenarios (``plain``, ``fished``); ``defenses``: defense specs
    (``"top-k:ratio=0.1"``, ``"mixup"``; ``"+"`` combines), each one more scenario named by its stack's label
    (:attr:`scenario_names`). ``label_smoothing``, ``class_weights``, ``focal_gamma``: the loss the clients train
    with (:class:`~fedleak.client_loss.ClientLoss`; the plain cross-entropy by default), which their gradients are
    of and the attack is told (it must take a client's loss, its registry entry's ``takes_loss``).
    """

    data: str = "digits"
    widths: tuple[int, ...] = (1024,)
    bias: bool = True
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    trials: int = 1
    seed: int = 0
    attack: str = "exclusivity"
    scenarios: tuple[str, ...] = ("plain",)
    split: str | None = None
    model: str | None = None  # a model spec (fedleak.models.zoo.load_model); replaces widths/bias/conv
    weights: str | None = None  # the model's state dict, for a built-in or a class
    budget: float = 20.0  # seconds per batch for attack="auto"
    conv: tuple[int, ...] = ()  # conv channels: audit a CNN (conv blocks, then an FC head of `widths`)
    defenses: tuple[str, ...] = ()
    client_mode: str = "train"  # the client computes its update in model.train() (Dropout, BatchNorm active) or eval
    label_smoothing: float = 0.0
    class_weights: tuple[float, ...] | None = None
    focal_gamma: float = 0.0

    def __post_init__(self) -> None:
        specs = (self.defenses,) if isinstance(self.defenses, str) else self.defenses
        object.__setattr__(self, "defenses", tuple(str(d) for d in specs))
        loss = ClientLoss(self.label_smoothing, self.class_weights, self.focal_gamma)  # checked together
        for name, value in loss.options().items():
            object.__setattr__(self, name, value)
        validate_fields(self)  # types and signs first, then the checks below
        if not self.batch_sizes or any(int(b) <= 0 for b in self.batch_sizes):
            raise FedleakError(f"batch sizes must be positive integers, got {list(self.batch_sizes)}")
        if not self.widths or any(int(w) <= 0 for w in self.widths):
            raise FedleakError(f"model widths must be positive integers, got {list(self.widths)}")
        if self.trials <= 0:
            raise FedleakError(f"trials must be positive, got {self.trials}")
        if not self.budget > 0:
            raise FedleakError(f"budget must be positive seconds, got {self.budget}")
        check_client_mode(self.client_mode)
        if not self.scenarios and not self.defenses:
            raise FedleakError("at least one scenario is needed")
        names = self.scenario_names  # OptionError for an unknown defense or a bad parameter
        check_distinct(names, "scenario(s)")
        check_loss_read((self.attack,), [DefenseStack.of(spec) for spec in self.defenses], loss)

    @property
    def loss(self) -> ClientLoss:
        """The loss the clients train with."""
        return ClientLoss(self.label_smoothing, self.class_weights, self.focal_gamma)

    @property
    def scenario_names(self) -> tuple[str, ...]:
        """Every audited scenario: the registered ones, then each defense spec's stack label."""
        return tuple(self.scenarios) + tuple(defense_label(spec) for spec in self.defenses)

    def to_dict(self) -> dict[str, object]:
        return {
            "data": self.data, "widths": list(self.widths), "bias": self.bias, "batch_sizes": list(self.batch_sizes),
            "trials": self.trials, "seed": self.seed, "attack": self.attack, "scenarios": list(self.scenarios),
            "split": self.split, "model": self.model, "weights": self.weights, "budget": self.budget,
            "conv": list(self.conv), "defenses": list(self.defenses), "client_mode": self.client_mode,
            "label_smoothing": self.label_smoothing, "focal_gamma": self.focal_gamma,
            "class_weights": None if self.class_weights is None else list(self.class_weights),
        }
