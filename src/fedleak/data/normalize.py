"""Per-channel mean/std normalisation of images, as users apply it before their model.

A model trained on ``(x - mean) / std`` (torchvision's ``Normalize``) takes inputs in that normalised space;
fedleak attacks it there. Scores and pictures are fairer in pixel space, so :func:`fedleak.metrics.match` and
the reports map both the originals and the reconstructions back with :meth:`Normalization.invert`.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fedleak.errors import DataError, FedleakError


@dataclass(frozen=True)
class Normalization:
    """``normalised = (pixel - mean[c]) / std[c]`` per channel ``c``; pixels live in ``pixel_range``."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    pixel_range: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        try:
            mean, std = _per_channel(self.mean), _per_channel(self.std)
            lo, hi = (float(v) for v in self.pixel_range)
        except (TypeError, ValueError):
            raise DataError("normalisation needs numbers: mean and std per channel (or one number for every "
                            "channel), pixel_range (low, high)") from None
        if not mean or len(mean) != len(std):
            raise DataError(f"normalisation needs one mean and one std per channel, got {len(mean)} and {len(std)}")
        if not all(math.isfinite(v) for v in mean + std + (lo, hi)) or min(std) <= 0 or not lo < hi:
            raise DataError("normalisation needs finite means, positive stds and pixel_range low < high")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "pixel_range", (lo, hi))

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 4 or x.shape[1] not in (1, len(self.mean)) and len(self.mean) != 1:
            raise DataError(f"normalisation of {len(self.mean)} channel(s) needs N x C x H x W images, got shape "
                            f"{tuple(x.shape)}")
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return mean, std

    def apply(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (N x C x H x W) to the model's normalised inputs."""
        mean, std = self._stats(pixels)
        return (pixels - mean) / std

    def invert(self, inputs: torch.Tensor) -> torch.Tensor:
        """Normalised inputs (N x C x H x W) back to pixels; never clamped."""
        mean, std = self._stats(inputs)
        return inputs * std + mean

    def of_pixel(self, value: float, dtype: torch.dtype = torch.float64, device: object = None) -> torch.Tensor:
        """The normalised values (``1 x C x 1 x 1``) of a pixel that is ``value`` in every channel: black, the middle
        of the range."""
        return self.apply(torch.full((1, len(self.mean), 1, 1), float(value), dtype=dtype, device=device))

    @property
    def input_range(self) -> tuple[float, float]:
        """The (low, high) every normalised value lies in (the union over channels)."""
        lo, hi = self.pixel_range
        ends = [(v - m) / s for m, s in zip(self.mean, self.std) for v in (lo, hi)]
        return min(ends), max(ends)

    def describe(self) -> str:
        """In words, e.g. ``(x - mean) / std with mean [0.5] and std [0.25]``."""
        return f"(x - mean) / std with mean {list(self.mean)} and std {list(self.std)}"

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std), "pixel_range": list(self.pixel_range)}


def check_normalization(value: object, error: type[FedleakError] = DataError) -> Normalization | None:
    """``value`` where it is a :class:`Normalization` or None, else ``error`` saying what to pass."""
    if value is None or isinstance(value, Normalization):
        return value
    raise error(f"normalization must be a fedleak.Normalization (fedleak.normalization(mean, std), or a data set's "
                f".normalization) or None, got {type(value).__name__}")


def normalization(mean: float | Sequence[float], std: float | Sequence[float],
                  pixel_range: Sequence[float] = (0.0, 1.0)) -> Normalization:
    """A :class:`Normalization` (checked), e.g. ``normalization((0.5,) * 3, (0.5,) * 3)`` maps [0, 1] to [-1, 1];
    one number stands for every channel."""
    return Normalization(mean, std, pixel_range)  # type: ignore[arg-type]


def _per_channel(value: object) -> tuple[float, ...]:
    """Per-channel numbers: a sequence of them, or one number (numpy's, a 0-d tensor) for every channel."""
    if isinstance(value, numbers.Real) or (isinstance(value, torch.Tensor) and value.dim() == 0):
        return (float(value),)
    return tuple(float(v) for v in value)  # type: ignore[union-attr]


#: a data folder's own statement of how its model sees it: ``{"mean": [...], "std": [...]}`` (JSON)
NORMALIZATION_FILE = "normalization.json"


def folder_normalization(folder: Path) -> tuple[object, object] | None:
    """The ``(mean, std)`` that ``folder``'s :data:`NORMALIZATION_FILE` states, or None without one (checked
    where the data set applies them, :meth:`~fedleak.data.Dataset.normalized`)."""
    path = folder / NORMALIZATION_FILE
    if not folder.is_dir() or not path.is_file():
        return None
    try:
        stated = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read it as JSON ({exc})") from None
    if not isinstance(stated, dict) or set(stated) != {"mean", "std"}:
        raise DataError(f'{path} must hold one JSON object with keys "mean" and "std" (one number per channel, '
                        'or one for all), e.g. {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}')
    return stated["mean"], stated["std"]
