"""The one type every data source produces."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedleak.data.normalize import Normalization
from fedleak.errors import DataError
from fedleak.validation import all_finite


@dataclass(frozen=True)
class Dataset:
    """A labelled image set: ``x`` float32, shape N x C x H x W; ``y`` int64 labels, shape N.

    ``value_range`` is the (low, high) range the pixel values live on; every value of ``x`` lies in it.
    Metrics measure errors in its units (:func:`fedleak.metrics.match`: "exact" is a max abs error of at
    most ``EXACT_TOL x (high - low)``, PSNR and SSIM use ``high - low`` as the data range) and reports
    display images on it. Every built-in loader and file reader scales pixels to [0, 1] (uint8 / 255,
    digits / 16, volumes / their maximum), hence the default ``(0.0, 1.0)``; a source with another
    range (e.g. raw 0..255 data) sets it.

    ``normalization`` is the per-channel mean/std map from pixels to ``x`` when the data is normalised as
    the model expects (:meth:`normalized`); metrics and reports then score and draw in pixel space.
    """

    name: str
    x: torch.Tensor
    y: torch.Tensor
    classes: tuple[str, ...]
    source: str = ""
    value_range: tuple[float, float] = (0.0, 1.0)
    normalization: Normalization | None = None

    def __post_init__(self) -> None:
        try:
            lo, hi = (float(v) for v in self.value_range)
        except (TypeError, ValueError):
            raise DataError(
                f"{self.name}: value_range must be two numbers (low, high), got {self.value_range!r}"
            ) from None
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise DataError(f"{self.name}: value_range must be finite with low < high, got ({lo:g}, {hi:g})")
        object.__setattr__(self, "value_range", (lo, hi))
        if self.x.ndim != 4:
            raise DataError(f"{self.name}: images must be N x C x H x W, got shape {tuple(self.x.shape)}")
        if self.y.ndim != 1 or self.y.shape[0] != self.x.shape[0]:
            raise DataError(f"{self.name}: {self.x.shape[0]} images but labels of shape {tuple(self.y.shape)}")
        if self.x.shape[0] == 0:
            raise DataError(f"{self.name}: the data set is empty")
        if not all_finite(self.x):
            raise DataError(f"{self.name}: images hold NaN or inf values")
        x_lo, x_hi = float(self.x.min()), float(self.x.max())
        slack = 1e-6 * (hi - lo) if self.normalization is not None else 0.0  # float rounding of (x - m) / s
        if x_lo < lo - slack or x_hi > hi + slack:
            raise DataError(f"{self.name}: images must lie in the value range [{lo:g}, {hi:g}] "
                            f"(found values in [{x_lo:g}, {x_hi:g}])")
        if int(self.y.min()) < 0 or int(self.y.max()) >= len(self.classes):
            raise DataError(f"{self.name}: labels must lie in [0, {len(self.classes) - 1}]")

    def normalized(self, mean: float | Sequence[float], std: float | Sequence[float]) -> Dataset:
        """This data normalised per channel as a model expects it: ``(x - mean) / std`` (one number, or one per
        channel).

        Flower's quickstart uses ``mean = std = (0.5, 0.5, 0.5)`` (pixels in [0, 1] become [-1, 1]); ImageNet
        models use ``(0.485, 0.456, 0.406)`` / ``(0.229, 0.224, 0.225)``. The result's ``value_range`` is the
        normalised range of the pixel range, and its ``normalization`` maps back for scores and pictures.
        """
        if self.normalization is not None:
            raise DataError(f"{self.name} is already normalised")
        norm = Normalization(mean, std, self.value_range)  # type: ignore[arg-type]
        if len(norm.mean) not in (1, self.input_shape[0]):
            raise DataError(f"{self.name} has {self.input_shape[0]} channel(s); got {len(norm.mean)} means")
        return Dataset(self.name, norm.apply(self.x), self.y, self.classes, self.source, norm.input_range, norm)

    @property
    def pixel_range(self) -> tuple[float, float]:
        """The range scores and pictures use: the pixel range of normalised data, else ``value_range``."""
        return self.normalization.pixel_range if self.normalization is not None else self.value_range

    def pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Model inputs (N x C x H x W) in pixel space: de-normalised when the data is normalised (unclamped)."""
        return self.normalization.invert(x) if self.normalization is not None else x

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.x.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def batch(self, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """A random batch of ``size`` distinct samples, drawn reproducibly from ``seed``."""
        if size <= 0:
            raise DataError(f"batch size must be positive, got {size}")
        if size > len(self):
            raise DataError(f"{self.name} has {len(self)} samples; cannot draw a batch of {size}")
        idx = torch.from_numpy(np.random.default_rng(seed).choice(len(self), size=size, replace=False))
        return self.x[idx], self.y[idx]


def to_nchw_unit(images: np.ndarray, name: str) -> torch.Tensor:
    """Images as N x H x W, N x H x W x C or N x C x H x W (uint8 or float) -> float32 N x C x H x W in [0, 1]."""
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4:
        if arr.shape[-1] in (1, 3, 4) and arr.shape[1] not in (1, 3, 4):
            arr = arr.transpose(0, 3, 1, 2)
    else:
        raise DataError(f"{name}: images must be N x H x W, N x H x W x C or N x C x H x W; got shape {arr.shape}")
    if arr.dtype == np.uint8:
        out = arr.astype(np.float32) / 255.0
    elif np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating):
        out = arr.astype(np.float32)
        if not np.isfinite(out).all():
            raise DataError(f"{name}: images hold NaN or inf values")
        lo, hi = float(out.min()), float(out.max())
        if lo < 0 or hi > 1:
            if np.issubdtype(arr.dtype, np.integer) and lo >= 0 and hi <= 255:
                out = out / 255.0
            else:
                raise DataError(f"{name}: float images must lie in [0, 1] (found values in [{lo:g}, {hi:g}])")
    else:
        raise DataError(f"{name}: unsupported image dtype {arr.dtype}")
    return torch.from_numpy(np.ascontiguousarray(out))
