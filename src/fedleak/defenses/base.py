"""What every client-side defense is, and the one registry they are all looked up in.

A defense acts at one of three stages of a client's round (:class:`Stage`):

* ``batch``: a :class:`BatchDefense` changes the batch before any gradient is computed (MixUp, InstaHide,
  DisguisedNets, exclusivity reduction). It is a :class:`~fedleak.transforms.BatchTransform`; it may return
  soft labels (an ``M x K`` float tensor of class probabilities).
* ``step``: a :class:`StepDefense` computes each local step's gradient itself (DP-SGD: per-sample clipping and
  noise).
* ``update``: an :class:`UpdateFilter` changes what the client sends, after local training (noise, clipping,
  sparsification, quantisation, sign compression, Soteria). Its :meth:`UpdateFilter.observe` is the defense's
  forward model, which a defense-aware attack puts into its loss.

Each defense is a frozen dataclass of its parameters, validated when built, registered under its name with
:func:`register_defense`; :func:`make_defense` builds one from a name and keyword arguments and
:func:`parse_defense` from a command-line spec ``"name:key=value,key=value"``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

import torch
from torch import nn

from fedleak.defenses.registry import available_defenses, defense_class, defense_classes, register_defense
from fedleak.errors import OptionError
from fedleak.option_fields import validate_fields
from fedleak.specs import parse_spec, spec_label
from fedleak.validation import describe


class Stage(str, Enum):
    """Where in the client's round a defense acts."""

    BATCH = "batch"
    STEP = "step"
    UPDATE = "update"


@dataclass(frozen=True)
class Accounting:
    """What a privacy accountant needs to know about the training a defense protects.

    ``rounds`` the client takes part in, ``local_steps`` per round, ``batch_size`` per step, ``dataset_size``
    the client's number of examples (DP-SGD's sampling rate is ``batch_size / dataset_size``),
    ``client_rate`` the fraction of clients sampled per round (client-level guarantees), ``delta`` the
    target δ.
    """

    rounds: int = 1
    local_steps: int = 1
    batch_size: int = 1
    dataset_size: int = 1
    client_rate: float = 1.0
    delta: float = 1e-5

    def __post_init__(self) -> None:
        validate_fields(self)
        if self.batch_size > self.dataset_size:
            raise OptionError(f"batch_size ({self.batch_size}) cannot exceed dataset_size ({self.dataset_size})")
        if not (0 < self.client_rate <= 1):
            raise OptionError(f"client_rate must lie in (0, 1], got {self.client_rate}")
        if not (0 < self.delta < 1):
            raise OptionError(f"delta must lie in (0, 1), got {self.delta}")

    @property
    def sample_rate(self) -> float:
        return self.batch_size / self.dataset_size


@dataclass(frozen=True)
class Privacy:
    """An (ε, δ) guarantee: ``unit`` is what it protects (``"example"``: one training example of the client;
    ``"client"``: a client's whole data), ``accountant`` who computed it, ``mechanism`` in words."""

    epsilon: float
    delta: float
    unit: str
    accountant: str
    mechanism: str

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ClientBatch:
    """The batch an update was computed from, for the update filters that need it (Soteria)."""

    model: nn.Module
    inputs: torch.Tensor
    labels: torch.Tensor


Tensors = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Defense:
    """Base of every defense: a frozen dataclass of parameters with a name, a stage and a source."""

    name: ClassVar[str] = ""
    stage: ClassVar[Stage]
    summary: ClassVar[str] = ""  # one line for listings
    source: ClassVar[str] = ""  # the paper or system it implements
    # settings for an evaluation grid, weakest first: keyword arguments of the class
    strengths: ClassVar[tuple[Mapping[str, object], ...]] = ({},)

    def __post_init__(self) -> None:
        validate_fields(self)
        self.check()

    def check(self) -> None:
        """Checks beyond :func:`~fedleak.option_fields.validate_fields` (ranges, choices); raise OptionError."""

    def params(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @property
    def label(self) -> str:
        """``name(key=value, ...)`` with the parameters that differ from their defaults."""
        return spec_label(self.name, self)

    def privacy(self, accounting: Accounting) -> Privacy | None:
        """The (ε, δ) this defense gives for ``accounting``'s training, or None when it has none."""
        return None


@dataclass(frozen=True)
class BatchDefense(Defense):
    """A defense on the batch before the gradient: ``defense(model, x, y) -> (x', y')``."""

    stage: ClassVar[Stage] = Stage.BATCH

    def __call__(self, model: nn.Module, inputs: torch.Tensor,
                 labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def at_inference(self, inputs: torch.Tensor) -> torch.Tensor:
        """What the model is given at test time: the inputs unchanged, unless the defense trains the model on
        transformed inputs that inference must see too (DisguisedNets' keyed transform)."""
        return inputs

    def shown(self, originals: torch.Tensor, rebuilt: torch.Tensor, *, paired: bool = False) -> torch.Tensor:
        """``originals`` as the client's images under this defense show them, for scoring ``rebuilt`` inputs: as
        they are, unless the defense moves an image's content in a way that hides none of it (augmentation's flip
        and shift: each original placed as the rebuilt image nearest to it shows it; with ``paired``, as
        ``rebuilt[i]``, the client's own image of ``originals[i]``, shows it)."""
        return originals


@dataclass(frozen=True)
class StepDefense(Defense):
    """A defense that computes each local step's gradient: ``gradient(model, x, y, generator)``, keyed like
    the model's trainable parameters, of the batch's mean loss (what plain autograd would return undefended)."""

    stage: ClassVar[Stage] = Stage.STEP

    def gradient(self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                 generator: torch.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError


@dataclass(frozen=True)
class UpdateFilter(Defense):
    """A defense on what the client sends: ``apply(update, batch, generator)`` maps the per-parameter update
    (a gradient, or a weight change ``before - after``) to what is transmitted.

    ``observe(simulated, observed)`` is the filter's forward model for a defense-aware attack: the
    transmitted form of an update the attacker simulates, differentiable in ``simulated`` (straight-through
    where the filter is piecewise constant); ``observed`` supplies what the filter revealed (a mask, a scale).
    ``known_function`` is False for filters whose randomness the attacker cannot replay (noise): their
    ``observe`` is the identity.
    """

    stage: ClassVar[Stage] = Stage.UPDATE
    known_function: ClassVar[bool] = True
    needs_batch: ClassVar[bool] = False

    def apply(self, update: Tensors, batch: ClientBatch | None, generator: torch.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def observe(self, simulated: Tensors, observed: Tensors) -> dict[str, torch.Tensor]:
        return dict(simulated)

    def encoded_bytes(self, sent: Tensors) -> int | None:
        """The size of the filter's encoding of ``sent`` on the wire; None: dense float32."""
        return None

    def aggregate_noise(self, clients: int) -> float:
        """The std of the Gaussian noise the server adds to the average of ``clients`` updates as part of this
        defense (central DP); 0 for a defense that lives on the client only."""
        return 0.0


def check_choice(owner: Defense, name: str, choices: tuple[str, ...]) -> None:
    """``owner.<name>`` must be one of ``choices`` (an OptionError that lists them otherwise)."""
    value = getattr(owner, name)
    if value not in choices:
        raise OptionError(f"option {name} of defense '{owner.name}' must be one of {list(choices)}, "
                          f"got {describe(value)}")


def check_open_range(owner: Defense, name: str, low: float, high: float, *, closed_high: bool = False) -> None:
    """``low < owner.<name> < high`` (``<= high`` with ``closed_high``)."""
    value = getattr(owner, name)
    ok = low < value <= high if closed_high else low < value < high
    if not ok:
        bracket = "]" if closed_high else ")"
        raise OptionError(f"option {name} of defense '{owner.name}' must lie in ({low:g}, {high:g}{bracket}, "
                          f"got {describe(value)}")


# ---------------------------------------------------------------------------------------------------------
# Building defenses by name (the registry itself: fedleak.defenses.registry)


def make_defense(name: str, **params: object) -> Defense:
    """The defense ``name`` with ``params`` (unknown parameter names are refused, listing the known ones)."""
    cls = defense_class(name)
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(k for k in params if k not in known)
    if unknown:
        raise OptionError(f"defense '{name}' has no parameter(s) {unknown}; its parameters: {known or 'none'}")
    required = [f.name for f in dataclasses.fields(cls) if f.init and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in params]
    if missing:
        example = ", ".join(f"{k}={v}" for k, v in cls.strengths[0].items()) if cls.strengths else ""
        raise OptionError(f"defense '{name}' needs {', '.join(missing)} (required: {', '.join(required)}"
                          + (f"; e.g. {example}" if example else "") + ")")
    return cls(**params)


def parse_defense(spec: str | Defense) -> Defense:
    """A defense from ``"name"`` or ``"name:key=value,key=value"`` (values converted to the parameter's type,
    :func:`~fedleak.specs.parse_spec`)."""
    if isinstance(spec, Defense):
        return spec
    name, params = parse_spec(spec, "defense", defense_class)
    return make_defense(name, **params)


__all__ = [
    "Accounting", "BatchDefense", "ClientBatch", "Defense", "Privacy", "Stage", "StepDefense", "UpdateFilter",
    "available_defenses", "check_choice", "check_open_range", "defense_classes", "defense_class", "make_defense",
    "parse_defense", "register_defense",
]
