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
from medinpaint.metal.evidence import slice_noise
from medinpaint.metal.learned_trust import TrustNet, learned_change
from medinpaint.metal.trust import trusted_change

if TYPE_CHECKING:
    from medinpaint.artifacts.metal import MetalDetection

METHODS = ("nmar", "li")


def check_ct(volume: Volume) -> None:
    if volume.modality != "CT":
        raise MedinpaintError(
            f"metal artifacts are found in CT (Hounsfield units); this volume looks like {volume.modality} "
            "(pass --modality CT if it really is a CT)"
        )


def geometry_for(volume: Volume, settings: MetalDetection, around: np.ndarray | None = None) -> FanBeamGeometry:
    """A fan-beam geometry matching the scan's in-plane grid (axial slices along k).

    The fan covers ``around`` (bool (H, W), e.g. the patient; default: the whole image, or 500 mm
    if larger). With ``auto`` the sampling follows the pixels: ~1.44 channels per pixel across
    that field (736 for a 500 mm field of 0.98 mm pixels) and as many views, so a fan fitted to
    the patient costs less than one fitted to the image's corners, at the same ray spacing.
    """
    spacing = tuple(float(s) for s in volume.spacing[:2])
    shape = tuple(volume.shape[:2])
    fov = FanBeamGeometry(shape, spacing).fov_diameter_mm if around is None else _field_mm(around, spacing)
    channels = settings.channels
    if channels == "auto":
        channels = max(64, math.ceil(1.44 * fov / min(spacing)))
    views = settings.views
    if views == "auto":
        views = max(64, 4 * math.ceil(channels / 4))
    for name, value in (("views", views), ("channels", channels)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 16:
            raise MedinpaintError(f"metal {name} must be auto or an integer of at least 16, not {value!r}")
    return FanBeamGeometry(shape, spacing, n_views=views, n_channels=channels, fov_mm=fov)


def _field_mm(around: np.ndarray, spacing: tuple[float, float], margin_px: float = 2.0) -> float:
    """Diameter (mm) of the circle about the isocentre that holds every True pixel of ``around``."""
    (h, w), (sy, sx) = around.shape, spacing
    i, j = np.nonzero(around)
    if len(i) == 0:
        return 2 * margin_px * max(sx, sy)
    radius = np.sqrt(((j - (w - 1) / 2) * sx) ** 2 + ((i - (h - 1) / 2) * sy) ** 2).max()
    return 2 * (float(radius) + margin_px * max(sx, sy))


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


def change_batches(volume: Volume, slices, metal, ks_all: list[int], settings: MetalDetection, method: str, progress: bool = False):
    """Yield (slice indices, image, metal, halo, change in HU) for ``ks_all`` of (k, i, j) arrays, a few slices at a time.

    The halo (the metal's bright rim, ``metal.halo_hu``) is re-filled with the metal's rays. Each
    batch has its own scanner, its fan fitted to the batch's patient (``geometry_for``); the
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
            halo = metal_halo(image, mask, settings.halo_hu, settings.halo_px, settings.halo_streak_hu)
        inside = patient(image, mask)
        change = mar_change(torch.from_numpy(image), torch.from_numpy(mask), geometry_for(volume, settings, around=inside),
                            method=method, trace_mask=torch.from_numpy(halo), pixels=torch.from_numpy(inside)).numpy()
        if settings.keep_high_frequencies_px:
            change = np.stack([ndimage.gaussian_filter(c, settings.keep_high_frequencies_px) for c in change])
        yield ks, image, mask, halo, np.where(mask, 0.0, change).astype(np.float32)


def metal_corrections(
    volume: Volume, metal: np.ndarray, slices: list[int], settings: MetalDetection | None = None, method: str = "nmar"
) -> dict[int, np.ndarray]:
    """Corrected slices (image + the trusted change) for ``slices`` given a metal mask (when the mask came from a file)."""
    from medinpaint.artifacts.metal import MetalDetection

    settings = settings or MetalDetection()
    check_ct(volume)
    spacing = tuple(float(s) for s in volume.spacing[:2])
    trust = trust_model(settings)
    batches = change_batches(volume, np.moveaxis(volume.array, 2, 0), np.moveaxis(metal, 2, 0), slices, settings, method)
    return {k: corrected_slice(i, kept_change(i, c, m, h, spacing, settings, trust)[0], m)
            for ks, image, mask, halo, change in batches for k, i, m, h, c in zip(ks, image, mask, halo, change)}


def trust_model(settings: MetalDetection) -> TrustNet | None:
    """The learned trust weight named by ``metal.trust_model``, or None (the gradient rule)."""
    if settings.trust_model is None:
        return None
    from medinpaint.inpaint.models import load_trust_model

    return load_trust_model(settings.trust_model)[0]


def kept_change(image: np.ndarray, change: np.ndarray, metal: np.ndarray, halo: np.ndarray, spacing: tuple[float, float],
                settings: MetalDetection, trust: TrustNet | None, noise: float | None = None) -> tuple[np.ndarray, float]:
    """The part of one slice's change to write and the share of its magnitude that is: weighted by ``trust`` when
    given, else by the gradient rule (``trust.trusted_change``; all of it when ``trust_window_mm`` is None)."""
    if trust is None:
        return trusted_change(image, change, metal, spacing, settings.trust_window_mm)
    if noise is None:
        noise = slice_noise(image, metal, settings.ring_mm / min(spacing))
    return learned_change(trust, image, change, metal, halo, spacing, settings.trust_window_mm, noise)
