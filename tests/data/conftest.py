"""The data tests' real images: small samples of Fashion-MNIST and of the retina patches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from data_files import to_uint8

import fedleak


@pytest.fixture(scope="module")
def fashion_small() -> tuple[np.ndarray, np.ndarray]:
    """120 real Fashion-MNIST test images (uint8 N x 28 x 28) with 12 of each class, and their labels."""
    data = fedleak.load_dataset("fashion-mnist")
    idx = torch.cat([torch.nonzero(data.y == c)[:12, 0] for c in range(10)])
    return to_uint8(data.x[idx, 0]), data.y[idx].numpy()


@pytest.fixture(scope="module")
def retina_small() -> tuple[np.ndarray, np.ndarray]:
    """60 real retina patches as uint8 N x 3 x 32 x 32 (CIFAR's layout), and their labels."""
    data = fedleak.load_dataset("retina")
    idx = torch.cat([torch.nonzero(data.y == c)[:30, 0] for c in range(2)])
    return to_uint8(data.x[idx]), data.y[idx].numpy()
