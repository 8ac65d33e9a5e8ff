"""Medical built-in sets, cut from images that ship with installed packages (nothing downloads).

* ``retina``: 32x32 RGB patches of scikit-image's fundus photograph, labelled vessel / background.
* ``mni152``: 32x32 brain-MRI slices of nilearn's MNI152 T1 template, labelled by orientation.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedleak.data.dataset import Dataset
from fedleak.data.registry import register_dataset
from fedleak.errors import DataError


@dataclass(frozen=True)
class RetinaRule:
    """How ``retina`` cuts and labels patches (documented in docs/data.md)."""

    patch: int = 32  # side of a patch, full-resolution pixels; patches tile the image without overlap
    margin: int = 12  # a patch's corners must lie this far inside the fundus disc
    vessel_min: float = 0.05  # a patch is "vessel" when at least this fraction of its pixels is vessel ...
    # ... and "background" when none is; patches in between are ambiguous and left out
    sigmas: tuple[float, ...] = (1.0, 2.0)  # Sato filter scales, on the image at half resolution


RETINA_RULE = RetinaRule()
RETINA_CLASSES = ("background", "vessel")


def retina_vessel_mask(rgb: np.ndarray, rule: RetinaRule = RETINA_RULE) -> tuple[np.ndarray, np.ndarray]:
    """(vessel mask, fundus-disc mask) at full resolution for an H x W x 3 uint8 fundus photograph.

    Vessels are dark ridges of the green channel: the Sato tubeness filter at half resolution, thresholded by
    Otsu's method over the disc. The disc is the circle fitted to the pixels whose red channel exceeds 30.
    """
    from skimage.filters import sato, threshold_otsu

    h, w = rgb.shape[:2]
    lit = rgb[..., 0] > 30
    if lit.sum() < 0.1 * h * w:
        raise DataError("retina image: no fundus disc found (image almost black)")
    ys, xs = np.nonzero(lit)
    cy, cx, radius = ys.mean(), xs.mean(), np.sqrt(lit.sum() / np.pi)
    yy, xx = np.ogrid[:h, :w]
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 < (radius - rule.margin) ** 2
    green = rgb[::2, ::2, 1].astype(np.float32) / 255.0
    tube = sato(green, sigmas=rule.sigmas, black_ridges=True)
    tube = np.repeat(np.repeat(tube, 2, axis=0), 2, axis=1)[:h, :w]
    vessels = (tube > threshold_otsu(tube[disc])) & disc
    return vessels, disc


@register_dataset("retina", "32x32 RGB patches of scikit-image's retina photograph inside the fundus disc, "
                            "labelled background / vessel (Sato vesselness)")
@lru_cache(maxsize=1)
def retina() -> Dataset:
    from skimage import data as skdata

    rule = RETINA_RULE
    try:
        rgb = np.asarray(skdata.retina())
    except Exception as exc:  # a stripped scikit-image install
        raise DataError(f"cannot read scikit-image's retina() image: {exc}") from None
    vessels, disc = retina_vessel_mask(rgb, rule)
    p = rule.patch
    rows, cols = rgb.shape[0] // p, rgb.shape[1] // p
    tiles = rgb[: rows * p, : cols * p].reshape(rows, p, cols, p, 3).transpose(0, 2, 4, 1, 3)  # r, c, C, p, p
    inside = disc[: rows * p, : cols * p].reshape(rows, p, cols, p).all(axis=(1, 3))
    frac = vessels[: rows * p, : cols * p].reshape(rows, p, cols, p).mean(axis=(1, 3))
    keep = inside & ((frac >= rule.vessel_min) | (frac == 0))
    x = torch.from_numpy(np.ascontiguousarray(tiles[keep])).to(torch.float32).div_(255.0)
    y = torch.from_numpy((frac[keep] >= rule.vessel_min).astype(np.int64))
    return Dataset("retina", x, y, RETINA_CLASSES, source="skimage.data.retina (patches, Sato vessel labels)")


# --- MNI152 -------------------------------------------------------------------------------------------------------

MNI152_SIZE = 32
MNI152_CLASSES = ("axial", "coronal", "sagittal")
MNI152_MIN_BRAIN = 0.10  # a slice is kept when brain (intensity > 0.05) covers at least this fraction of it
_MNI152_FILE = "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
_INSTALL_HINT = "the mni152 data set needs nilearn and nibabel: pip install 'fedleak[medical]'"


def mni152_volume() -> np.ndarray:
    """nilearn's 1 mm MNI152 T1 template (197 x 233 x 189, RAS axes) as float32 scaled to [0, 1].

    Reads the file that ``nilearn.datasets.load_mni152_template(resolution=1)`` reads, and scales it the same
    way, without importing nilearn (which takes seconds); falls back to that function if the file moved.
    """
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"nilearn is not installed; {_INSTALL_HINT}")
    try:
        import nibabel
    except ImportError:
        raise DataError(f"nibabel is not installed; {_INSTALL_HINT}") from None
    path = Path(list(spec.submodule_search_locations)[0]) / _MNI152_FILE
    try:
        if path.exists():
            volume = np.asarray(nibabel.load(path).dataobj, dtype=np.float32)
        else:  # pragma: no cover - another nilearn layout
            from nilearn.datasets import load_mni152_template

            volume = np.asarray(load_mni152_template(resolution=1).get_fdata(), dtype=np.float32)
    except ImportError as exc:
        raise DataError(f"cannot import nilearn ({exc}); {_INSTALL_HINT}") from None
    except Exception as exc:
        raise DataError(f"cannot read the MNI152 template {path}: {exc}") from None
    if volume.ndim != 3 or not np.isfinite(volume).all() or volume.max() <= 0:
        raise DataError(f"the MNI152 template {path} is not a finite non-empty 3-D volume")
    return np.clip(volume / volume.max(), 0.0, 1.0)


def mni152_slices(volume: np.ndarray, size: int = MNI152_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Every 1 mm slice of a RAS volume in each orientation as size x size images, and orientation labels.

    The volume is first cropped to the brain's bounding box; every slice is padded (centred, zeros) to a square of
    the box's longest side, so all orientations share one scale, then area-averaged to size x size. Slices are
    shown as a radiologist's viewer would put them: superior (axial: anterior) at the top.
    """
    nz = np.nonzero(volume > 0)
    box = volume[tuple(slice(int(a.min()), int(a.max()) + 1) for a in nz)]
    stacks = (
        np.flip(box.transpose(2, 1, 0), axis=1),  # axial: k -> rows y (anterior up), cols x
        np.flip(box.transpose(1, 2, 0), axis=1),  # coronal: j -> rows z (superior up), cols x
        np.flip(box.transpose(0, 2, 1), axis=1),  # sagittal: i -> rows z (superior up), cols y
    )
    side = max(box.shape)
    images, labels = [], []
    for label, stack in enumerate(stacks):
        n, h, w = stack.shape
        square = np.zeros((n, side, side), dtype=np.float32)
        top, left = (side - h) // 2, (side - w) // 2
        square[:, top : top + h, left : left + w] = stack
        small = F.interpolate(torch.from_numpy(square)[:, None], size=(size, size), mode="area")[:, 0].numpy()
        brain = (small > 0.05).mean(axis=(1, 2))
        keep = brain >= MNI152_MIN_BRAIN
        images.append(small[keep])
        labels.append(np.full(int(keep.sum()), label, dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


@register_dataset("mni152", "32x32 grey brain-MRI slices of nilearn's MNI152 template, labelled axial / coronal / "
                            "sagittal (needs fedleak[medical])")
@lru_cache(maxsize=1)
def mni152() -> Dataset:
    images, labels = mni152_slices(mni152_volume())
    x = torch.from_numpy(np.clip(images, 0.0, 1.0))[:, None]
    return Dataset("mni152", x, torch.from_numpy(labels), MNI152_CLASSES,
                   source="nilearn MNI152 T1 template, 1 mm (slices, orientation labels)")
