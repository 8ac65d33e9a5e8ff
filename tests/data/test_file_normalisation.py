"""User data files that state how their values read: an .npz with mean/std or its own value_range, a data
folder with normalization.json."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from data_files import raises_data_error, write_cifar10, write_image_folder

import fedleak
from fedleak.data import load_path


def test_npz_with_normalisation_or_its_own_range(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.random((6, 3, 4, 4)).astype(np.float32)
    y = np.array([0, 1, 2, 0, 1, 2])
    np.savez(tmp_path / "norm.npz", x=pixels, y=y, mean=np.array([0.5, 0.4, 0.3]), std=np.array([0.2, 0.25, 0.3]))
    data = fedleak.load_dataset(tmp_path / "norm.npz")
    assert data.normalization is not None and data.pixel_range == (0.0, 1.0)
    assert np.allclose(data.pixels(data.x).numpy(), pixels, atol=1e-6)
    np.savez(tmp_path / "pm1.npz", x=pixels * 2 - 1, y=y, value_range=np.array([-1.0, 1.0]))
    data = fedleak.load_dataset(tmp_path / "pm1.npz")
    assert data.value_range == (-1.0, 1.0) and float(data.x.min()) < 0 and data.normalization is None
    np.savez(tmp_path / "both.npz", x=pixels, y=y, value_range=np.array([0, 1.0]), mean=np.array([0.5]),
             std=np.array([0.5]))
    with pytest.raises(fedleak.DataError, match="not both"):
        fedleak.load_dataset(tmp_path / "both.npz")
    np.savez(tmp_path / "out.npz", x=pixels * 3, y=y, value_range=np.array([0, 1.0]))
    with pytest.raises(fedleak.DataError, match="value range"):
        fedleak.load_dataset(tmp_path / "out.npz")


def test_a_folder_states_its_normalisation(tmp_path: Path, retina_small: tuple[np.ndarray, np.ndarray]) -> None:
    """A data folder (image folder, CIFAR) with normalization.json is loaded as its model sees it, as an .npz with
    mean/std is: the images normalised, the map kept for scores in pixel space; a bad file is one DataError."""
    x, y = retina_small
    write_image_folder(tmp_path / "rgb", x, y)
    plain = load_path(tmp_path / "rgb")
    (tmp_path / "rgb" / "normalization.json").write_text('{"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}')
    seen = load_path(tmp_path / "rgb")
    assert seen.value_range == (-1.0, 1.0) and seen.pixel_range == (0.0, 1.0) and len(seen) == len(plain)
    assert torch.allclose(seen.pixels(seen.x), plain.x, atol=1e-6) and torch.equal(seen.y, plain.y)
    write_cifar10(tmp_path / "cifar", x, y)
    (tmp_path / "cifar" / "normalization.json").write_text('{"mean": 0.5, "std": 0.25}')
    assert fedleak.load_dataset(tmp_path / "cifar", split="train").value_range == (-2.0, 2.0)
    for text, problem in [("[0.5]", 'keys "mean" and "std"'), ('{"mean": 0.5}', 'keys "mean" and "std"'),
                          ("{mean: 1}", "cannot read it as JSON"),
                          ('{"mean": [0.5, 0.5], "std": [1, 1]}', "got 2 means"),
                          ('{"mean": 0.5, "std": -1}', "positive stds")]:
        (tmp_path / "rgb" / "normalization.json").write_text(text)
        raises_data_error(tmp_path / "rgb", problem)
