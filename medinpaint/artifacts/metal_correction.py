"""Metal correction of reconstructed CT slices: add back only the change that LI/NMAR makes.

Corrected = image + FBP(MAR sinogram - sinogram of the image). The sinogram difference is zero
outside the metal trace, so where the change is negligible the acquired voxels stay as they are
(a full project/FBP round trip would blur every voxel it touches). Optionally FSMAR-like
(Meyer et al. 2012): the change is low-passed, so the image keeps its own high frequencies.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy import ndimage
from tqdm import tqdm

from medinpaint.body import body_mask
from medinpaint.data.volume import Volume
from medinpaint.errors import MedinpaintError
from medinpaint.metal.fanbeam import FanBeamGeometry
from medinpaint.metal.mar import mar_change
from medinpaint.metal.masks import metal_halo

if TYPE_CHECKING:
    from medinpaint.artifacts.metal import MetalDetection

METHODS = ("nmar", "li")


def check_ct(volume: Volume) -> None:
    if volume.modality != "CT":
        raise MedinpaintError(
            f"metal artifacts are found in CT (Hounsfield units); this volume looks like {volume.modality} "
            "(pass --modality CT if it really is a CT)"
        )


def geometry_for(volume: Volume, settings: MetalDetection) -> FanBeamGeometry:
    """A fan-beam geometry matching the scan's in-plane grid (axial slices along k).

    With ``auto`` the sampling follows the pixels: a clinical 736 channels x ~720 views for a
    512 x 512 slice of 0.98 mm, proportionally fewer for coarse grids, where more rays would
    only cost time.
    """
    spacing = tuple(float(s) for s in volume.spacing[:2])
    shape = tuple(volume.shape[:2])
    fov = FanBeamGeometry(shape, spacing).fov_diameter_mm
    channels = settings.channels
    if channels == "auto":
        channels = max(64, math.ceil(1.44 * fov / min(spacing)))
    views = settings.views
    if views == "auto":
        views = max(64, 4 * math.ceil(channels / 4))
    for name, value in (("views", views), ("channels", channels)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 16:
            raise MedinpaintError(f"metal {name} must be auto or an integer of at least 16, not {value!r}")
    return FanBeamGeometry(shape, spacing, n_views=views, n_channels=channels)


def corrected_slice(image: np.ndarray, change: np.ndarray, metal: np.ndarray) -> np.ndarray:
    """The image plus the change; the metal kept as acquired."""
    return np.where(metal, image, image + change).astype(np.float32)


def patient(images: np.ndarray, metal: np.ndarray, margin_px: int = 8) -> np.ndarray:
    """Bool (H, W): the body of any of ``images`` (k, i, j) and the metal, grown by ``margin_px``.

    The change is back-projected there only: outside the patient it would only correct air, and
    back-projection costs in proportion to the pixels.
    """
    inside = (body_mask(images, slice_axis=0) | metal).any(axis=0)
    return ndimage.binary_dilation(inside, iterations=margin_px)


def change_batches(slices, metal, ks_all: list[int], geometry, settings: MetalDetection, method: str, progress: bool = False):
    """Yield (slice indices, image, metal, halo, change in HU) for ``ks_all`` of (k, i, j) arrays, a few slices at a time.

    The halo (the metal's bright rim, ``metal.halo_hu``) is re-filled with the metal's rays; the
    change is low-passed by ``metal.keep_high_frequencies_px`` when set (FSMAR-like).
    """
    if method not in METHODS:
        raise MedinpaintError(f"unknown metal correction {method!r}; choose nmar or li")
    batches = [ks_all[i : i + settings.slices_per_batch] for i in range(0, len(ks_all), settings.slices_per_batch)]
    for ks in tqdm(batches, desc="metal correction", unit="batch", disable=not progress or len(batches) < 2):
        image = np.nan_to_num(slices[ks], nan=-1024.0).astype(np.float32)
        mask = np.ascontiguousarray(metal[ks])
        halo = np.zeros(mask.shape, dtype=bool)
        if settings.halo_hu is not None:
            halo = metal_halo(image, mask, settings.halo_hu, settings.halo_px)
        change = mar_change(torch.from_numpy(image), torch.from_numpy(mask), geometry, method=method,
                            trace_mask=torch.from_numpy(halo), pixels=torch.from_numpy(patient(image, mask))).numpy()
        if settings.keep_high_frequencies_px:
            change = np.stack([ndimage.gaussian_filter(c, settings.keep_high_frequencies_px) for c in change])
        yield ks, image, mask, halo, np.where(mask, 0.0, change).astype(np.float32)


def metal_corrections(
    volume: Volume, metal: np.ndarray, slices: list[int], settings: MetalDetection | None = None, method: str = "nmar"
) -> dict[int, np.ndarray]:
    """Corrected slices (image + change) for ``slices`` given a metal mask (when the mask came from a file)."""
    from medinpaint.artifacts.metal import MetalDetection

    settings = settings or MetalDetection()
    check_ct(volume)
    geometry = geometry_for(volume, settings)
    batches = change_batches(np.moveaxis(volume.array, 2, 0), np.moveaxis(metal, 2, 0), slices, geometry, settings, method)
    return {k: corrected_slice(i, c, m) for ks, image, mask, _, change in batches for k, i, m, c in zip(ks, image, mask, change)}
