"""DisguisedNets: a secret, keyed transform of every image before training (Sharma & Chen 2019).

Sharma and Chen, "DisguisedNets: Secure Image Outsourcing for Confidential Model Training in Clouds" (ICCCN
2019; also "Confidential Boosting with Random Linear Classifiers for Outsourced User-generated Data", the same
authors' random-transform line of work): the data owners cut each image into ``block x block`` blocks, shuffle
the blocks with a secret permutation and, optionally, multiply each block's pixels by a secret random
orthogonal matrix (their randomised multidimensional transformation). The model is trained on the disguised
images only; the key, shared by all data owners (clients), is never given to the server, so what a gradient
inversion recovers is a disguised image.

The transform is linear and orthogonal, hence invertible by whoever holds the key
(:meth:`DisguisedNets.invert`). The secret is drawn from a ``torch.Generator`` seeded with ``key`` (the
orthogonal matrix first, then the permutation of the blocks), never from the global generator, so one key
gives one transform in every call and every process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from fedleak.defenses.base import BatchDefense, register_defense
from fedleak.errors import OptionError
from fedleak.validation import MAX_SEED


@dataclass(frozen=True)
class DisguiseKey:
    """The secret of one key for one image size: ``permutation[p]`` is the input block shown at block position
    ``p`` (blocks numbered row by row), ``rotation`` the ``block^2 x block^2`` orthogonal matrix (float64) applied
    to each block's pixels flattened row by row, per channel."""

    permutation: torch.Tensor
    rotation: torch.Tensor

    @classmethod
    def derive(cls, key: int, block: int, num_blocks: int) -> DisguiseKey:
        generator = torch.Generator().manual_seed(int(key))
        gaussian = torch.randn(block * block, block * block, generator=generator, dtype=torch.float64)
        q, r = torch.linalg.qr(gaussian)
        signs = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(torch.float64)
        return cls(torch.randperm(num_blocks, generator=generator), q * signs)  # Haar-distributed


@register_defense
@dataclass(frozen=True)
class DisguisedNets(BatchDefense):
    """DisguisedNets (Sharma & Chen 2019, "DisguisedNets: Secure Image Outsourcing for Confidential Model Training
    in Clouds"; "Confidential Boosting with Random Linear Classifiers"): block permutation and per-block random
    orthogonal projection of every image, keyed by a secret ``key`` shared by all clients.

    Images ``(N, C, H, W)`` are cut into ``block x block`` blocks; the blocks are permuted by a key-derived
    permutation (the same for every image and channel); with ``projection``, each block's pixels (flattened,
    per channel) are multiplied by a key-derived random orthogonal ``block^2 x block^2`` matrix. Labels are
    unchanged. ``H`` and ``W`` must be multiples of ``block``. The result is not clamped: a rotated block leaves
    the data range. :meth:`invert` undoes the transform (the key holder's view).
    """

    name: ClassVar[str] = "disguisednets"
    summary: ClassVar[str] = "secret block permutation and per-block orthogonal projection of every image (keyed)"
    source: ClassVar[str] = "Sharma & Chen 2019 (DisguisedNets)"
    # blocks of 2 and 4 divide 8 x 8 digits, 28 x 28 Fashion-MNIST and 32 x 32 CIFAR images alike
    strengths: ClassVar[tuple[dict[str, object], ...]] = (
        {"block": 4, "projection": False}, {"block": 2}, {"block": 4})

    block: int = 4
    key: int = field(default=0, metadata={"high": MAX_SEED})
    projection: bool = True

    def check(self) -> None:
        if self.block < 1:
            raise OptionError(f"option block of defense '{self.name}' (the block side in pixels) must be at least 1, "
                              f"got {self.block}")

    def __call__(self, model: nn.Module, inputs: torch.Tensor,
                 labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.disguise(inputs), labels

    def secret(self, height: int, width: int) -> DisguiseKey:
        """The permutation and the orthogonal matrix of this key for ``height x width`` images."""
        return DisguiseKey.derive(self.key, self.block, (height // self.block) * (width // self.block))

    def at_inference(self, inputs: torch.Tensor) -> torch.Tensor:
        """The model is trained on disguised images, so it is tested on disguised images (same key)."""
        return self.disguise(inputs)

    def disguise(self, images: torch.Tensor) -> torch.Tensor:
        """The disguised images (same shape and dtype)."""
        blocks = self._blocks(images)
        secret = self.secret(*images.shape[2:])
        blocks = blocks[:, :, secret.permutation]
        if self.projection:
            blocks = blocks @ secret.rotation.T.to(blocks.dtype)
        return self._images(blocks, images.shape)

    def invert(self, disguised: torch.Tensor) -> torch.Tensor:
        """The original images of ``disguised`` (what only a holder of the key can compute)."""
        blocks = self._blocks(disguised)
        secret = self.secret(*disguised.shape[2:])
        if self.projection:
            blocks = blocks @ secret.rotation.to(blocks.dtype)
        return self._images(blocks[:, :, torch.argsort(secret.permutation)], disguised.shape)

    def _blocks(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` -> ``(N, C, blocks, block^2)``, blocks row by row, pixels row by row."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or not images.is_floating_point():
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise OptionError(f"defense '{self.name}' needs floating-point images (N, C, H, W), got {shape}"
                              f"{'' if not isinstance(images, torch.Tensor) else f' ({images.dtype})'}")
        n, c, h, w = images.shape
        b = self.block
        if h % b or w % b:
            raise OptionError(f"option block of defense '{self.name}' must divide the image height and width "
                              f"({h} x {w}), got {b}")
        return images.reshape(n, c, h // b, b, w // b, b).permute(0, 1, 2, 4, 3, 5).reshape(n, c, -1, b * b)

    def _images(self, blocks: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        n, c, h, w = shape
        b = self.block
        return blocks.reshape(n, c, h // b, w // b, b, b).permute(0, 1, 2, 4, 3, 5).reshape(n, c, h, w)
