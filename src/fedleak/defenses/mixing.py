"""Batch defenses that mix the samples of a batch: MixUp and InstaHide.

Both replace every sample ``i`` of a batch of ``M`` by a convex combination of ``k`` samples of the same batch,

    x'_i = sum_j lam_ij x_{pi_j(i)},    y'_i = sum_j lam_ij onehot(y_{pi_j(i)}),

with ``pi_1`` the identity, ``pi_2 .. pi_k`` independent random permutations of the batch and the row
``lam_i`` drawn from a Dirichlet distribution; the labels become soft labels (an ``M x K`` float tensor whose
rows sum to 1). InstaHide then flips the sign of every value of the mixture around the middle of the data
range. Randomness comes from torch's global generator, which :func:`fedleak.defenses.defended_gradient` and the
federation seed for each batch, so a seed gives one mixing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from fedleak.client_loss import is_soft
from fedleak.clients.mode import client_mode
from fedleak.data.normalize import Normalization, check_normalization
from fedleak.defenses.base import BatchDefense, register_defense
from fedleak.errors import OptionError
from fedleak.fishing.perturb import resolve_data_range
from fedleak.validation import check_data_range


@dataclass(frozen=True)
class Mixture:
    """One mixing of a batch: sample ``i`` of the result is ``sum_j weights[i, j] * x[sources[i, j]]``."""

    sources: torch.Tensor  # M x k sample indices, column 0 the identity
    weights: torch.Tensor  # M x k convex coefficients (rows sum to 1)

    @classmethod
    def draw(cls, size: int, k: int, alpha: float) -> Mixture:
        """``k - 1`` random permutations of ``size`` samples and Dirichlet(``alpha``) coefficients."""
        columns = [torch.arange(size)] + [torch.randperm(size) for _ in range(k - 1)]
        concentration = torch.full((size, k), float(alpha), dtype=torch.float64)
        weights = torch.distributions.Dirichlet(concentration).sample()
        return cls(torch.stack(columns, 1), weights)

    def apply(self, values: torch.Tensor) -> torch.Tensor:
        """The mixed rows of ``values`` (any M x ... tensor), in its dtype."""
        w = self.weights.to(values.dtype).reshape(*self.weights.shape, *([1] * (values.ndim - 1)))
        return (w * values[self.sources]).sum(1)


def label_distribution(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                       num_classes: int | None) -> torch.Tensor:
    """``labels`` as an ``M x K`` float tensor of class probabilities (one-hot for class indices).

    ``K`` is ``num_classes``, else the width of soft labels, else the model's output width (one forward pass of
    one sample in eval mode, with no gradient; the modules' train/eval modes are restored afterwards).
    """
    dtype = inputs.dtype if inputs.is_floating_point() else torch.get_default_dtype()
    if is_soft(labels):
        if num_classes is not None and labels.shape[1] != num_classes:
            raise OptionError(f"num_classes is {num_classes} but the soft labels have {labels.shape[1]} columns")
        return labels.to(dtype)
    classes = num_classes if num_classes is not None else model_classes(model, inputs)
    hard = labels.long()
    if hard.numel() and (int(hard.min()) < 0 or int(hard.max()) >= classes):
        raise OptionError(f"labels must lie in [0, {classes - 1}] for num_classes={classes}, "
                          f"found {int(hard.min())}..{int(hard.max())}")
    return nn.functional.one_hot(hard, classes).to(dtype)


def model_classes(model: nn.Module, inputs: torch.Tensor) -> int:
    """The model's number of outputs, from one forward pass of the first sample (eval mode, no gradient); 2 for a
    binary classifier's one logit (squeezed or not), which takes soft labels of two classes."""
    with client_mode(model, "eval"), torch.no_grad():
        dtype = next(model.parameters()).dtype
        logits = model(inputs[:1].to(dtype))
    if isinstance(logits, torch.Tensor) and logits.ndim in (1, 2) and logits.numel() == 1:
        return 2  # one logit (a (1,) or (1, 1) output for the one sample)
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[1] < 2:
        raise OptionError("cannot tell the number of classes from the model's output; pass num_classes")
    return int(logits.shape[1])


def mix_batch(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, k: int, alpha: float,
              num_classes: int | None) -> tuple[torch.Tensor, torch.Tensor, Mixture]:
    """The batch mixed ``k`` at a time with Dirichlet(``alpha``) coefficients, its soft labels and the mixing."""
    if not inputs.is_floating_point():
        raise OptionError(f"mixing needs floating-point inputs, got {inputs.dtype}; pass x.float()")
    soft = label_distribution(model, inputs, labels, num_classes)
    mixture = Mixture.draw(int(inputs.shape[0]), k, alpha)
    return mixture.apply(inputs), mixture.apply(soft), mixture


@register_defense
@dataclass(frozen=True)
class MixUp(BatchDefense):
    """MixUp (Zhang, Cisse, Dauphin, Lopez-Paz, ICLR 2018, "mixup: Beyond Empirical Risk Minimization"), used as a
    defense against gradient inversion as in the GradAttack benchmark (Huang, Gupta, Song, Li, Arora, NeurIPS
    2021, "Evaluating Gradient Inversion Attacks and Defenses in Federated Learning").

    Sample ``i`` becomes ``sum_j lam_ij x_{pi_j(i)}`` with ``pi_1`` the identity, ``pi_2 .. pi_k`` random
    permutations of the batch and ``lam_i ~ Dirichlet(alpha * 1_k)``; its label the same mixture of one-hot
    labels (soft labels, rows sum to 1). A batch of one sample is returned unchanged (nothing to mix with).
    ``num_classes`` (None: the model's output width) sizes the one-hot labels.
    """

    name: ClassVar[str] = "mixup"
    summary: ClassVar[str] = "each sample becomes a Dirichlet mixture of k samples of the batch, with soft labels"
    source: ClassVar[str] = "Zhang et al. ICLR 2018 (MixUp), as a defense in GradAttack, Huang et al. NeurIPS 2021"
    strengths: ClassVar[tuple[dict[str, object], ...]] = (
        {"k": 2, "alpha": 0.5}, {"k": 2, "alpha": 1.0}, {"k": 4, "alpha": 1.0})

    k: int = 2
    alpha: float = 1.0
    num_classes: int | None = None

    def check(self) -> None:
        check_mixing(self, self.k, self.num_classes)
        if not self.alpha > 0:
            raise OptionError(f"option alpha of defense '{self.name}' (the Dirichlet concentration) must be > 0, "
                              f"got {self.alpha:g}")

    def __call__(self, model: nn.Module, inputs: torch.Tensor,
                 labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if inputs.shape[0] < 2:
            return inputs, labels
        mixed, soft, _ = mix_batch(model, inputs, labels, self.k, self.alpha, self.num_classes)
        return mixed, soft


@register_defense
@dataclass(frozen=True)
class InstaHide(BatchDefense):
    """InstaHide (Huang, Song, Li, Arora, ICML 2020, "InstaHide: Instance-hiding Schemes for Private Distributed
    Learning"), inside-dataset variant.

    Each sample is mixed with ``k - 1`` others of the batch (``pi_1`` the identity, ``pi_2 .. pi_k`` random
    permutations of the batch) with Dirichlet(1) coefficients, the labels the same way (soft labels); then every
    value of the mixture is multiplied by an independent random sign around the middle ``mid`` of the data
    range: ``x' = (mix - mid) * s + mid`` with ``s`` uniform in {-1, +1}, so ``|x' - mid| = |mix - mid|`` and
    ``x'`` stays in the range. ``data_range`` (None: [0, 1] when the batch lies in it, else the batch's own
    [min, max]) and ``num_classes`` (None: the model's output width) are filled by
    :meth:`~fedleak.defenses.DefenseStack.bind` where known; for data normalised per channel, so is
    ``normalization``, and the middle is each channel's image of the pixels' middle (``data_range`` then in pixels),
    so every channel stays in its own range. The cross-dataset variant, which also mixes in
    public images (and gives their mixing weight no label), is not implemented.
    """

    name: ClassVar[str] = "instahide"
    summary: ClassVar[str] = "Dirichlet mixture of k batch samples (soft labels), then a random sign per value"
    source: ClassVar[str] = "Huang, Song, Li, Arora, ICML 2020 (InstaHide, inside-dataset)"
    strengths: ClassVar[tuple[dict[str, object], ...]] = ({"k": 2}, {"k": 4}, {"k": 6})

    k: int = 4
    data_range: tuple[float, float] | None = None
    num_classes: int | None = None
    normalization: Normalization | None = None

    def check(self) -> None:
        check_mixing(self, self.k, self.num_classes)
        object.__setattr__(self, "data_range", check_data_range(self.data_range, error=OptionError))
        check_normalization(self.normalization, error=OptionError)

    def __call__(self, model: nn.Module, inputs: torch.Tensor,
                 labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        norm = self.normalization
        lo, hi = resolve_data_range(inputs if norm is None else norm.invert(inputs), self.data_range, "instahide")
        mixed, soft, _ = mix_batch(model, inputs, labels, self.k, 1.0, self.num_classes)
        mid: float | torch.Tensor = 0.5 * (lo + hi)
        if norm is not None:  # each channel's image of the pixels' middle
            mid = norm.of_pixel(mid, mixed.dtype, mixed.device)
        signs = torch.randint(0, 2, mixed.shape).to(mixed.dtype) * 2 - 1
        return (mixed - mid) * signs + mid, soft


def check_mixing(owner: BatchDefense, k: int, num_classes: int | None) -> None:
    """``k >= 2`` samples per mixture and, when given, ``num_classes >= 2``."""
    if k < 2:
        raise OptionError(f"option k of defense '{owner.name}' (samples per mixture) must be at least 2, got {k}")
    if num_classes is not None and num_classes < 2:
        raise OptionError(f"option num_classes of defense '{owner.name}' must be at least 2, got {num_classes}")
