"""Motion-compensated slice interpolation, the slice network's second view of a gap.

Linear interpolation cross-fades an edge that moves between the slices around a gap into
two faint edges.  Here the two slices are registered to each other (SimpleITK's symmetric
forces demons, coarse to fine) and a missing slice at fraction t of the gap blends both,
each warped t (or 1 - t) of the way along the displacement, so a moving edge stays one edge.
It helps most across wide gaps (runs of slices, thick MR slices); the network learns where
to trust it over interpolation.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import map_coordinates
from tqdm import tqdm

from medinpaint.inpaint.classical import valid_neighbours

ITERATIONS = 100  # demons iterations per pyramid level
SMOOTHING = 3.0  # Gaussian smoothing of the displacement field, in pixels of the level
LEVELS = (4, 2, 1)  # pyramid shrink factors, coarse to fine


def registered_slices(array: np.ndarray, bad_slices: list[int], progress: bool = False,
                      wanted: Collection[int] | None = None) -> dict[int, np.ndarray]:
    """Each bad slice (last axis) filled from its nearest valid slices, following their motion.

    A slice with valid slices on one side only gets a copy of the nearest, as in
    ``interpolate_slices``.  Only valid slices are read; NaNs in them count as 0.  With
    ``wanted``, only the gaps that hold one of those slices are registered (all of each such gap).
    """
    bad = set(bad_slices)
    valid = [k for k in range(array.shape[2]) if k not in bad]
    gaps: dict[tuple[int | None, int | None], list[int]] = {}
    for k in sorted(bad):
        below, above = valid_neighbours(valid, k)
        gaps.setdefault((below[-1] if below else None, above[0] if above else None), []).append(k)
    if wanted is not None:
        wanted = set(wanted)
        gaps = {ends: ks for ends, ks in gaps.items() if wanted.intersection(ks)}
    filled = {}
    for (k0, k1), ks in tqdm(gaps.items(), desc="registering slices", unit="gap", disable=not progress or len(gaps) < 2):
        if k0 is None or k1 is None:
            nearest = np.nan_to_num(array[:, :, k1 if k0 is None else k0]).astype(np.float32)
            filled |= {k: nearest for k in ks}
            continue
        a = np.nan_to_num(array[:, :, k0]).astype(np.float32)
        b = np.nan_to_num(array[:, :, k1]).astype(np.float32)
        a_unit, b_unit = _unit_range(a, b)
        forward = displacement(a_unit, b_unit)  # a(p) ~ b(p + forward(p))
        backward = displacement(b_unit, a_unit)  # b(p) ~ a(p + backward(p))
        for k in ks:
            t = (k - k0) / (k1 - k0)
            filled[k] = ((1 - t) * _warp(a, -t * forward) + t * _warp(b, -(1 - t) * backward)).astype(np.float32)
    return filled


def with_registered_slices(base: np.ndarray, array: np.ndarray, bad_slices: list[int], transform=None) -> np.ndarray:
    """A copy of ``base`` whose bad slices hold ``array``'s registered fill (through ``transform``, e.g. a normaliser).

    This is the network's third input: the pre-fill everywhere else, so the two differ only where
    registration has something to say.
    """
    guide = base.copy()
    for k, plane in registered_slices(array, bad_slices).items():
        guide[:, :, k] = plane if transform is None else transform(plane)
    return guide


def displacement(fixed: np.ndarray, moving: np.ndarray) -> np.ndarray:
    """Per-pixel (row, column) displacement with fixed(p) ~ moving(p + d(p))."""
    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    demons.SetNumberOfIterations(ITERATIONS)
    demons.SetStandardDeviations(SMOOTHING)
    fixed_image, moving_image = sitk.GetImageFromArray(fixed), sitk.GetImageFromArray(moving)
    field = None
    for shrink in LEVELS:
        fixed_level = sitk.Shrink(fixed_image, [shrink] * 2) if shrink > 1 else fixed_image
        moving_level = sitk.Shrink(moving_image, [shrink] * 2) if shrink > 1 else moving_image
        if field is None:
            start = sitk.Image(fixed_level.GetSize(), sitk.sitkVectorFloat64)
            start.CopyInformation(fixed_level)
        else:  # the coarser field, resampled onto this level's grid (values are physical, so unchanged)
            start = sitk.Resample(field, fixed_level, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
        field = demons.Execute(fixed_level, moving_level, start)
    return sitk.GetArrayFromImage(field)[..., ::-1]  # SimpleITK stores (x, y) = (column, row)


def _unit_range(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both slices on a shared 0..1 scale (1st to 99th percentile), so demons compares like with like."""
    lo, hi = np.percentile(np.concatenate([a.ravel(), b.ravel()]), [1, 99])
    scale = max(float(hi - lo), 1e-6)
    return tuple(np.clip((x - lo) / scale, 0, 1).astype(np.float32) for x in (a, b))


def _warp(image: np.ndarray, shift: np.ndarray) -> np.ndarray:
    rows, cols = np.meshgrid(np.arange(image.shape[0]), np.arange(image.shape[1]), indexing="ij")
    return map_coordinates(image, [rows + shift[..., 0], cols + shift[..., 1]], order=1, mode="nearest")
