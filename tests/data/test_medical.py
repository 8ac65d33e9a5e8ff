"""Medical built-ins: retina patches and MNI152 slices."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import fedleak
from fedleak.data import medical
from fedleak.errors import DataError


def test_retina_patches_shape_range_and_classes() -> None:
    data = fedleak.load_dataset("retina")
    assert data.classes == ("background", "vessel")
    assert data.input_shape == (3, 32, 32) and data.x.dtype == torch.float32
    assert 1000 <= len(data) <= 1400
    assert 0.0 <= float(data.x.min()) and float(data.x.max()) <= 1.0
    counts = torch.bincount(data.y, minlength=2)
    assert int(counts.min()) > 0.3 * len(data)  # both classes well represented
    # patches lie inside the fundus: no black (outside-the-eye) pixels in any patch
    assert float(data.x[:, 0].amin(dim=(1, 2)).min()) > 30 / 255 - 1e-6
    assert len({bytes(p.numpy().tobytes()) for p in data.x}) == len(data)


def test_retina_labels_follow_the_vessel_rule() -> None:
    from skimage.data import retina

    rgb = retina()
    vessels, disc = medical.retina_vessel_mask(rgb)
    assert 0.03 < vessels[disc].mean() < 0.15  # vessels are a small share of the fundus
    data = fedleak.load_dataset("retina")
    # a vessel crossing a patch makes its green channel far less uniform than a background patch's
    spread = data.x[:, 1].flatten(1).std(dim=1)
    assert float(spread[data.y == 1].median()) > 2 * float(spread[data.y == 0].median())
    # each patch is a verbatim tile of the photograph: find the first one in the image
    p = data.x[0].permute(1, 2, 0).mul(255).round().to(torch.uint8).numpy()
    tiles = rgb[: rgb.shape[0] // 32 * 32, : rgb.shape[1] // 32 * 32]
    tiles = tiles.reshape(rgb.shape[0] // 32, 32, rgb.shape[1] // 32, 32, 3).transpose(0, 2, 1, 3, 4)
    hits = np.argwhere((tiles == p).all(axis=(2, 3, 4)))
    assert len(hits) == 1
    r, c = hits[0]
    frac = vessels[r * 32 : r * 32 + 32, c * 32 : c * 32 + 32].mean()
    assert (frac >= medical.RETINA_RULE.vessel_min) == bool(data.y[0]) and (frac == 0 or bool(data.y[0]))


def test_mni152_slices() -> None:
    pytest.importorskip("nibabel")
    if __import__("importlib").util.find_spec("nilearn") is None:
        pytest.skip("nilearn not installed")
    data = fedleak.load_dataset("mni152")
    assert data.classes == ("axial", "coronal", "sagittal")
    assert data.input_shape == (1, 32, 32)
    assert 350 <= len(data) <= 520
    counts = torch.bincount(data.y, minlength=3)
    assert int(counts.min()) > 0.25 * len(data)
    assert 0.0 <= float(data.x.min()) and 0.5 < float(data.x.max()) <= 1.0
    brain = (data.x > 0.05).float().mean(dim=(1, 2, 3))
    assert float(brain.min()) >= medical.MNI152_MIN_BRAIN  # near-empty slices were dropped
    # sagittal slices are deeper (front-to-back) than wide: brain spans more columns than rows
    sag = data.x[data.y == 2, 0] > 0.05
    mid = sag[len(sag) // 2]
    assert int(mid.any(dim=0).sum()) > int(mid.any(dim=1).sum())


def test_mni152_volume_matches_nilearn() -> None:
    nilearn_datasets = pytest.importorskip("nilearn.datasets")
    ours = medical.mni152_volume()
    theirs = nilearn_datasets.load_mni152_template(resolution=1).get_fdata()
    assert ours.shape == theirs.shape == (197, 233, 189)
    assert np.allclose(ours, theirs, atol=1e-6)


def test_mni152_without_nilearn_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nilearn", None)  # makes nilearn unimportable
    medical.mni152.cache_clear()
    try:
        with pytest.raises(DataError, match=r"fedleak\[medical\]"):
            fedleak.load_dataset("mni152")
    finally:
        medical.mni152.cache_clear()
