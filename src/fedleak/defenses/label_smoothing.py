"""Label smoothing as a client-side defense: the client trains on the target ``(1 - s) onehot(y) + s/K``
instead of ``onehot(y)``, what ``F.cross_entropy(..., label_smoothing=s)`` does (the gradient is the same).

It is a training recipe's regulariser more than a privacy measure, but it changes every sample's loss vector,
which label-inference rules and the exclusivity attack read; so a client may ask whether it protects. The
inputs are left as they are: the exclusivity attack, told the smoothing (or reading it off the update, with four
classes or more), rebuilds and certifies them as without it
(:data:`fedleak.attacks.defense_aware.EXACT_RULES`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from fedleak.client_loss import check_label_smoothing
from fedleak.defenses.base import BatchDefense, register_defense
from fedleak.defenses.mixing import label_distribution
from fedleak.errors import OptionError


@register_defense
@dataclass(frozen=True)
class LabelSmoothing(BatchDefense):
    """Label smoothing (Szegedy et al., CVPR 2016, "Rethinking the Inception Architecture"): every label becomes
    ``(1 - smoothing) onehot(y) + smoothing / K`` (soft labels, rows sum to 1; soft labels given are smoothed the
    same way, as torch does). ``num_classes`` (None: the model's output width) sizes the one-hot labels."""

    name: ClassVar[str] = "label-smoothing"
    summary: ClassVar[str] = "train on (1 - smoothing) onehot(y) + smoothing / K (F.cross_entropy's label_smoothing)"
    source: ClassVar[str] = "Szegedy et al. CVPR 2016 (Inception-v3); torch's CrossEntropyLoss(label_smoothing=...)"
    strengths: ClassVar[tuple[dict[str, object], ...]] = ({"smoothing": 0.1}, {"smoothing": 0.2}, {"smoothing": 0.4})

    smoothing: float = 0.1
    num_classes: int | None = None

    def check(self) -> None:
        try:
            check_label_smoothing(self.smoothing)
        except ValueError as exc:
            raise OptionError(f"option smoothing of defense '{self.name}': {exc}") from None
        if self.num_classes is not None and self.num_classes < 2:
            raise OptionError(f"option num_classes of defense '{self.name}' must be at least 2, got {self.num_classes}")

    def __call__(self, model: nn.Module, inputs: torch.Tensor,
                 labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        soft = label_distribution(model, inputs, labels, self.num_classes)
        return inputs, (1 - self.smoothing) * soft + self.smoothing / soft.shape[1]
