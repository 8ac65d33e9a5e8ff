"""Data augmentation as clients run it: a random horizontal flip and a random crop after padding, per image.

The standard image-training recipe (He et al. 2016, torchvision's ``RandomCrop(size, padding)`` then
``RandomHorizontalFlip()``) changes every local batch at random: each image is padded by ``padding`` pixels of
``fill`` on every side, a window of its own size is cut at a random offset (a shift of up to ``padding`` pixels in
each direction, the pixels shifted out of the frame lost and ``fill`` shifted in) and, with probability 1/2, the
result is mirrored left to right. Gao et al. (CVPR 2021, ATS) propose augmentation policies as a defense against
gradient inversion.

What a gradient of an augmented batch gives away is the augmented images, which show what the originals show: a
mirrored or shifted face is the face. :meth:`Augmentation.shown` places each original as the rebuilt image nearest
to it shows it (flipped, shifted, ``fill`` where the shift moved pixels out), so that leakage is scored on every
pixel of the original the client's image kept, not on the frame; the evaluation and the audit score it so. Randomness
comes from torch's global generator, which the federation and the evaluation seed for each batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from fedleak.data.normalize import Normalization, check_normalization
from fedleak.defenses.base import BatchDefense, register_defense
from fedleak.errors import OptionError
from fedleak.validation import check_data_range


@dataclass(frozen=True)
class Placement:
    """Where one augmentation put an image: its content moved by ``(down, right)`` pixels, then mirrored left to
    right when ``mirrored``."""

    down: int
    right: int
    mirrored: bool


@register_defense
@dataclass(frozen=True)
class Augmentation(BatchDefense):
    """Random horizontal flip (``flip``, probability 1/2) and random crop after padding by ``padding`` pixels of
    ``fill`` (a shift of up to ``padding`` pixels in each direction) of every image ``(N, C, H, W)``; labels
    unchanged. ``fill=None``: black once the stack is bound to the data: the low end of the data's range, or, for data
    normalised per channel (``normalization``), each channel's image of the pixels' low end; else 0.
    """

    name: ClassVar[str] = "augmentation"
    summary: ClassVar[str] = ("random horizontal flip and random crop after padding (a shift of up to `padding` "
                              "pixels) of every image")
    source: ClassVar[str] = ("the standard image-training recipe (RandomCrop with padding, RandomHorizontalFlip); "
                             "augmentation as a defense: ATS, Gao et al. CVPR 2021")
    strengths: ClassVar[tuple[dict[str, object], ...]] = ({"padding": 0}, {"padding": 2}, {"padding": 4})

    flip: bool = True
    padding: int = 4
    fill: float | None = field(default=None, metadata={"low": None})  # any value: normalised data goes below 0
    data_range: tuple[float, float] | None = None
    normalization: Normalization | None = None

    def check(self) -> None:
        object.__setattr__(self, "data_range", check_data_range(self.data_range, error=OptionError))
        check_normalization(self.normalization, error=OptionError)
        if not self.flip and self.padding == 0:
            raise OptionError(f"defense '{self.name}' with flip=False and padding=0 leaves every image as it is: "
                              "set flip=True or a padding of at least 1")

    @property
    def fill_value(self) -> float | torch.Tensor:
        """The value shifted into the frame: one number, or one per channel (``C x 1 x 1``) for normalised data."""
        if self.fill is not None:
            return float(self.fill)
        if self.normalization is not None:
            return self.normalization.of_pixel(self.normalization.pixel_range[0])[0]
        return float(self.data_range[0]) if self.data_range is not None else 0.0

    def __call__(self, model: nn.Module, inputs: torch.Tensor,
                 labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_images(inputs, "images")
        n = inputs.shape[0]
        p = self.padding
        down = torch.randint(-p, p + 1, (n,)).tolist() if p else [0] * n
        right = torch.randint(-p, p + 1, (n,)).tolist() if p else [0] * n
        mirrored = (torch.rand(n) < 0.5).tolist() if self.flip else [False] * n
        out = torch.stack([self.place(img, Placement(d, r, m)) for img, d, r, m in zip(inputs, down, right, mirrored)])
        return out, labels

    def placements(self) -> list[Placement]:
        """Every placement this augmentation can draw, the identity first."""
        shifts = [(0, 0)] + [(d, r) for d in range(-self.padding, self.padding + 1)
                             for r in range(-self.padding, self.padding + 1) if (d, r) != (0, 0)]
        flips = (False, True) if self.flip else (False,)
        return [Placement(d, r, m) for m in flips for d, r in shifts]

    def place(self, images: torch.Tensor, placement: Placement) -> torch.Tensor:
        """``images`` (``(..., H, W)``) moved by ``placement``: shifted, the pixels shifted in set to the fill, then
        mirrored."""
        out = _shifted(images, placement.down, placement.right, self.fill_value)
        return out.flip(-1) if placement.mirrored else out

    def shown(self, originals: torch.Tensor, rebuilt: torch.Tensor, *, paired: bool = False) -> torch.Tensor:
        """``originals`` as this augmentation could have shown them: each moved by the placement that brings it
        nearest (least squared error) to one of ``rebuilt`` (any ``R x ...`` tensor of the originals' size per
        sample; with ``paired``, ``rebuilt[i]`` is the client's own image of ``originals[i]`` and only it is
        looked at), the identity unless another is strictly nearer. A rebuilt augmented image is scored against its
        original placed the same way: every pixel the client's image kept is compared, and the pixels the shift
        lost are the fill on both sides."""
        self._check_images(originals, "originals")
        if rebuilt.shape[0] == 0 or rebuilt[0].numel() != originals[0].numel():
            return originals  # nothing to place them by (the scoring reports a size that does not fit)
        flat_r = rebuilt.reshape(rebuilt.shape[0], -1).to(originals.device, originals.dtype)

        def distance(images: torch.Tensor) -> torch.Tensor:
            flat = images.reshape(len(images), -1)
            return (flat - flat_r).norm(dim=1) if paired else torch.cdist(flat, flat_r).amin(1)

        best, best_err = originals, distance(originals)
        for placement in self.placements()[1:]:
            moved = self.place(originals, placement)
            err = distance(moved)
            nearer = err < best_err
            if bool(nearer.any()):
                best = torch.where(nearer.reshape(-1, 1, 1, 1), moved, best)
                best_err = torch.minimum(err, best_err)
        return best

    def _check_images(self, images: torch.Tensor, what: str) -> None:
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise OptionError(f"defense '{self.name}' needs floating-point {what} (N, C, H, W), got {shape}")
        h, w = images.shape[2:]
        if self.padding >= min(h, w):
            raise OptionError(f"option padding of defense '{self.name}' must be smaller than the image's height and "
                              f"width ({h} x {w}), got {self.padding}")


def _shifted(images: torch.Tensor, down: int, right: int, fill: float | torch.Tensor) -> torch.Tensor:
    """``images`` (``(..., H, W)``) with their content moved ``down`` rows and ``right`` columns (negative: up,
    left), ``fill`` (a number, or one per channel) where nothing moved in."""
    if down == 0 and right == 0:
        return images.clone()
    h, w = images.shape[-2:]
    out = torch.empty_like(images)
    out[...] = torch.as_tensor(fill, dtype=images.dtype, device=images.device)
    src_r, dst_r = (slice(0, h - down), slice(down, h)) if down >= 0 else (slice(-down, h), slice(0, h + down))
    src_c, dst_c = (slice(0, w - right), slice(right, w)) if right >= 0 else (slice(-right, w), slice(0, w + right))
    out[..., dst_r, dst_c] = images[..., src_r, src_c]
    return out
