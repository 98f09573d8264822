"""Metal and its streaks in a reconstructed CT, from the image alone (labels 7 and 6).

Real scans come without raw data or a metal-free twin.  The metal is found by threshold
(``medinpaint.metal.masks.find_metal``); each slice that holds metal is re-projected and
corrected with NMAR, and the streak region is where the image departs from that correction.
The NMAR slices are kept: they are the classical fill and the network's starting point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from medinpaint.data.volume import Volume
from medinpaint.errors import MedinpaintError
from medinpaint.metal.fanbeam import FanBeamGeometry
from medinpaint.metal.mar import li_mar, nmar
from medinpaint.metal.masks import find_metal, metal_halo, streak_region


@dataclass(frozen=True)
class MetalDetection:
    """Settings for metal detection and the image-domain re-projection (see configs/inference.yaml)."""

    threshold_hu: float | None = None  # None: 2500 HU, or 2800 HU when the scan is clipped at 3071
    min_voxels: int = 3  # smaller bright specks are noise, not metal
    streak_threshold_hu: float = 40.0  # |image - NMAR| above this (smoothed) is streak
    halo_hu: float | None = 600.0  # the rim around metal above this HU is re-filled with it (None: the metal alone, literature LI/NMAR)
    halo_px: int = 12  # how far from the metal that rim may reach
    views: int | str = "auto"  # re-projection views over 360 degrees; auto: as many as channels
    channels: int | str = "auto"  # detector channels; auto: ~1.44 per pixel across the field (736 for 512 x 0.98 mm)
    slices_per_batch: int = 4  # slices re-projected together (memory vs speed)

    def __post_init__(self) -> None:
        if self.halo_hu is not None and (isinstance(self.halo_hu, bool) or not isinstance(self.halo_hu, (int, float))):
            raise MedinpaintError(f"metal halo_hu must be a number of HU or null, not {self.halo_hu!r}")
        if isinstance(self.halo_px, bool) or not isinstance(self.halo_px, int) or self.halo_px < 1:
            raise MedinpaintError(f"metal halo_px must be an integer of at least 1, not {self.halo_px!r}")


@dataclass
class MetalFinding:
    """Metal (kept) and streak region (filled) on the volume's grid, with the corrected slices."""

    metal: np.ndarray  # bool (i, j, k)
    streaks: np.ndarray  # bool (i, j, k)
    corrected: dict[int, np.ndarray] = field(default_factory=dict)  # k -> classical correction (HU), slices with metal
    method: str = "nmar"


def geometry_for(volume: Volume, settings: MetalDetection) -> FanBeamGeometry:
    """A fan-beam geometry matching the scan's in-plane grid (axial slices along k).

    With ``auto`` the sampling follows the pixels: a clinical 736 channels x ~720 views for a
    512 x 512 slice of 0.98 mm, proportionally fewer for coarse grids, where more rays would
    only cost time.
    """
    spacing = tuple(float(s) for s in volume.spacing[:2])
    shape = tuple(volume.shape[:2])
    field = FanBeamGeometry(shape, spacing).fov_diameter_mm
    channels = settings.channels
    if channels == "auto":
        channels = max(64, math.ceil(1.44 * field / min(spacing)))
    views = settings.views
    if views == "auto":
        views = max(64, 4 * math.ceil(channels / 4))
    for name, value in (("views", views), ("channels", channels)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 16:
            raise MedinpaintError(f"metal {name} must be auto or an integer of at least 16, not {value!r}")
    return FanBeamGeometry(shape, spacing, n_views=views, n_channels=channels)


def check_ct(volume: Volume) -> None:
    if volume.modality != "CT":
        raise MedinpaintError(
            f"metal artifacts are found in CT (Hounsfield units); this volume looks like {volume.modality} "
            "(pass --modality CT if it really is a CT)"
        )


def find_metal_artifacts(
    volume: Volume,
    settings: MetalDetection | None = None,
    method: str = "nmar",
    skip_slices: set[int] | frozenset[int] = frozenset(),
    progress: bool = False,
) -> MetalFinding:
    """Metal and streak masks, plus the LI or NMAR correction of every slice holding metal."""
    settings = settings or MetalDetection()
    check_ct(volume)
    if method not in ("nmar", "li"):
        raise MedinpaintError(f"unknown metal correction {method!r}; choose nmar or li")
    slices = np.moveaxis(volume.array, 2, 0)  # (k, i, j): the projector works slice by slice
    metal = find_metal(slices, settings.threshold_hu, settings.min_voxels)  # NaN is never above the threshold
    metal[sorted(skip_slices)] = False  # whole bad slices are filled as slices, not corrected
    streaks = np.zeros(slices.shape, dtype=bool)
    corrected: dict[int, np.ndarray] = {}
    with_metal = [int(k) for k in np.flatnonzero(metal.any(axis=(1, 2)))]
    if with_metal:
        geometry = geometry_for(volume, settings)
        for ks, image, mask, halo, fixed in _corrected_batches(slices, metal, with_metal, geometry, settings, method, progress):
            # the halo is re-filled by the correction, so it is always part of the synthesized region
            streaks[ks] = streak_region(image, mask, geometry, nmar_image=fixed, threshold_hu=settings.streak_threshold_hu) | halo
            corrected.update(zip(ks, fixed.numpy()))
    return MetalFinding(
        metal=np.moveaxis(metal, 0, 2), streaks=np.moveaxis(streaks, 0, 2), corrected=corrected, method=method
    )


def metal_corrections(
    volume: Volume, metal: np.ndarray, slices: list[int], settings: MetalDetection | None = None, method: str = "nmar"
) -> dict[int, np.ndarray]:
    """LI or NMAR slices for ``slices`` given a metal mask (when the mask came from a file)."""
    settings = settings or MetalDetection()
    check_ct(volume)
    geometry = geometry_for(volume, settings)
    batches = _corrected_batches(np.moveaxis(volume.array, 2, 0), np.moveaxis(metal, 2, 0), slices, geometry, settings, method)
    return {k: s for ks, _, _, _, fixed in batches for k, s in zip(ks, fixed.numpy())}


def _corrected_batches(slices, metal, ks_all: list[int], geometry, settings: MetalDetection, method: str, progress: bool = False):
    """Yield (slice indices, image, metal mask, halo, LI/NMAR correction) for ``ks_all`` of (k, i, j) arrays, a few slices at a time."""
    correct = nmar if method == "nmar" else li_mar
    batches = [ks_all[i : i + settings.slices_per_batch] for i in range(0, len(ks_all), settings.slices_per_batch)]
    for ks in tqdm(batches, desc="metal correction", unit="batch", disable=not progress or len(batches) < 2):
        image = torch.from_numpy(np.nan_to_num(slices[ks], nan=-1024.0).astype(np.float32))
        mask = torch.from_numpy(np.ascontiguousarray(metal[ks]))
        halo = np.zeros(mask.shape, dtype=bool)
        if settings.halo_hu is not None:
            halo = metal_halo(image.numpy(), mask.numpy(), settings.halo_hu, settings.halo_px)
        yield ks, image, mask, halo, correct(image, mask, geometry, trace_mask=torch.from_numpy(halo))  # the metal is always in the trace
