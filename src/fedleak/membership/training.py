"""How the target (and every shadow model) is trained in a membership experiment: a seeded MLP, mini-batch SGD
for a number of epochs, each step's gradient computed through the client's defenses (DP-SGD by Opacus, or any
other defense of :mod:`fedleak.defenses`) by the same defended client loop the federation uses."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from fedleak.clients.defended import defended_local_round
from fedleak.defenses.base import Accounting, Privacy
from fedleak.defenses.stack import DefenseStack
from fedleak.errors import OptionError
from fedleak.membership.base import Records
from fedleak.models import make_mlp
from fedleak.option_fields import validate_fields
from fedleak.validation import check_seed


@dataclass(frozen=True)
class TrainingRecipe:
    """A model and how it is trained: an MLP of hidden ``widths`` on inputs of ``input_shape`` with
    ``num_classes`` outputs, or the user's ``model`` (a spec :func:`fedleak.models.zoo.load_model` reads: a
    built-in name or ``path/to/file.py:Class``, starting from ``weights`` when given), ``epochs`` passes of
    plain SGD at ``lr`` over shuffled mini-batches of ``batch_size``, each step's gradient through ``defense``
    (a defense spec such as
    ``"dp-sgd:noise_multiplier=1.0,max_grad_norm=1.0"``; ``"none"``: plain autograd), and ``delta`` for the
    privacy accountant."""

    input_shape: tuple[int, ...]
    num_classes: int
    widths: tuple[int, ...] = (256,)
    epochs: int = 30
    batch_size: int = 64
    lr: float = field(default=0.1, metadata={"low": 1e-12})
    defense: str = "none"
    delta: float = field(default=1e-5, metadata={"low": 1e-12, "high": 0.5})
    model: str | None = None
    weights: str | None = None
    data_range: tuple[float, float] | None = None  # the inputs' range, for defenses that need it (augmentation's fill)

    def __post_init__(self) -> None:
        validate_fields(self)
        object.__setattr__(self, "widths", tuple(self.widths))
        object.__setattr__(self, "input_shape", tuple(self.input_shape))
        if self.epochs < 1 or self.batch_size < 1:
            raise OptionError(f"epochs and batch_size must be at least 1, got {self.epochs} and {self.batch_size}")
        if self.weights is not None and self.model is None:
            raise OptionError("weights need a model: give the model they belong to as well")
        self.stack()  # an unknown defense fails here, before anything trains

    def build(self, seed: int) -> nn.Module:
        """The untrained model: the MLP initialised from ``seed``, or the user's model (from ``weights`` when
        given); :class:`~fedleak.errors.ModelError` when it does not run on the data's inputs or has fewer outputs
        than the data has classes."""
        if self.model is None:
            return make_mlp(self.input_shape, list(self.widths), self.num_classes, seed=seed)
        from fedleak.models.zoo import load_model_for

        return load_model_for(self.model, self.input_shape, self.num_classes, weights=self.weights, seed=seed,
                              binary=True)  # one logit for two classes too (binary cross-entropy)

    def stack(self) -> DefenseStack:
        return DefenseStack.of(self.defense)

    def steps(self, size: int) -> int:
        return self.epochs * -(-size // self.batch_size)

    def privacy(self, size: int) -> tuple[Privacy, ...]:
        """The (ε, δ) guarantees the defense gives a training set of ``size`` records (none without DP)."""
        batch = min(self.batch_size, size)
        return self.stack().privacy(Accounting(rounds=1, local_steps=self.steps(size), batch_size=batch,
                                               dataset_size=size, delta=self.delta))

    def train(self, records: Records, seed: int) -> nn.Module:
        """A fresh model (initialised from ``seed``) trained on ``records``; the same seed gives the same model."""
        seed = check_seed("seed", seed)
        model = self.build(seed)
        gen = torch.Generator().manual_seed(seed)
        n = len(records)
        batches = []
        for _ in range(self.epochs):
            order = torch.randperm(n, generator=gen)
            batches.extend(order[i:i + self.batch_size] for i in range(0, n, self.batch_size))
        model.train()
        with torch.random.fork_rng(devices=[]):  # batch defenses (augmentation, MixUp) draw from torch's generator
            torch.manual_seed(seed)
            defended_local_round(model, ((records.inputs[b], records.labels[b]) for b in batches),
                                 self.stack().bind(data_range=self.data_range, num_classes=self.num_classes),
                                 lr=self.lr, generator=gen)
        model.eval()
        return model
