"""A plain image object: voxel array + voxel-to-world affine + where it came from.

Like nibabel's images, nothing is hidden: ``array`` is indexed ``[i, j, k]`` (k is the
slice / acquisition axis for DICOM series), ``affine`` maps ``(i, j, k, 1)`` to RAS+
millimetres, exactly as MONAI's MetaTensor and nibabel do.  Affines may be sheared
(a gantry-tilted stack is kept oblique, never resampled).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from medinpaint.errors import MedinpaintError

# RAS <-> LPS flips the first two world axes (DICOM and ITK are LPS, NIfTI and MONAI RAS).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Source:
    """Where a volume was read from, enough to write a faithful derived copy."""

    path: Path
    format: str  # "nifti", "nrrd", "mha", "dicom"
    stored_dtype: str  # dtype of the stored values after any rescale (e.g. "int16")
    series_uid: str | None = None
    # DICOM only: one file per slice along k (None where a slice was missing and a
    # placeholder was inserted), and the frame number for enhanced multi-frame files.
    slice_files: tuple[Path | None, ...] = ()
    slice_frames: tuple[int | None, ...] = ()
    description: str = ""
    # DICOM only: every file of the series in slice-position order, including those that were
    # only interpolated from or not used (irregular spacing), so the input's hash covers them all.
    input_files: tuple[Path, ...] = ()


@dataclass
class Volume:
    """A 3D scalar volume in float32 with its exact geometry."""

    array: np.ndarray
    affine: np.ndarray
    modality: str = "OT"  # DICOM modality code: "CT", "MR", or "OT" when unknown
    source: Source | None = None
    # k-indices of slices that were absent from the acquisition and inserted as
    # placeholders on the regular grid; they hold no measured data.
    placeholder_slices: tuple[int, ...] = field(default_factory=tuple)
    # k-indices of grid positions that lie between acquired slices (irregular spacing) and hold
    # values interpolated from them at load time: not measured, flagged ``resampled_slice``.
    resampled_slices: tuple[int, ...] = field(default_factory=tuple)
    # How a DICOM series' slice positions were put on the grid (steps found, grid step, plan);
    # None for formats that store a regular grid themselves.
    slice_grid: dict | None = None

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.array.ndim != 3:
            raise MedinpaintError(f"expected a 3D volume, got an array of shape {self.array.shape}")
        if self.affine.shape != (4, 4):
            raise MedinpaintError(f"affine must be 4x4, got {self.affine.shape}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along i, j, k (column norms of the affine)."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def origin(self) -> np.ndarray:
        return self.affine[:3, 3].copy()

    @property
    def direction(self) -> np.ndarray:
        """Unit direction of each voxel axis in RAS (columns); sheared if the stack is tilted."""
        return self.affine[:3, :3] / self.spacing

    @property
    def is_oblique_stack(self) -> bool:
        """True when the k axis is not perpendicular to the i-j plane (gantry tilt)."""
        d = self.direction
        return abs(float(np.dot(np.cross(d[:, 0], d[:, 1]), d[:, 2]))) < 1 - 1e-4

    def with_array(self, array: np.ndarray) -> "Volume":
        """Same geometry and provenance, new voxel values."""
        if array.shape != self.array.shape:
            raise ValueError(f"shape {array.shape} does not match volume {self.array.shape}")
        return replace(self, array=array)

    def slab(self, start: int, stop: int) -> "Volume":
        """Slices ``start..stop-1`` as a volume of their own: the origin moves, nothing else changes.

        A new, standalone scan (no source, no placeholders or resampled slices): for simulation and training pairs.
        """
        if not 0 <= start < stop <= self.shape[2]:
            raise MedinpaintError(f"slab {start}:{stop} is outside the {self.shape[2]} slices")
        affine = self.affine.copy()
        affine[:3, 3] = self.affine[:3, :3] @ np.array([0.0, 0.0, float(start)]) + self.affine[:3, 3]
        return Volume(np.ascontiguousarray(self.array[:, :, start:stop]), affine, modality=self.modality)

    def acquired_run(self) -> "Volume":
        """The longest run of slices read as acquired (neither placeholders nor resampled onto the grid), as
        a slab: what may serve as truth for training or a benchmark."""
        made = set(self.placeholder_slices) | set(self.resampled_slices)
        best, start = (0, 0), 0
        for k in range(self.shape[2] + 1):
            if k == self.shape[2] or k in made:
                best = max(best, (k - start, start))
                start = k + 1
        length, first = best
        if not length:
            raise MedinpaintError("no acquired slice: every slice is a placeholder or resampled")
        return self.slab(first, first + length)

    def same_grid(self, other: "Volume", atol_mm: float = 1e-3) -> bool:
        return self.shape == other.shape and np.allclose(self.affine, other.affine, atol=atol_mm)

    def describe(self) -> dict:
        """Geometry summary used by ``medinpaint info`` and the provenance."""
        finite = np.isfinite(self.array)
        values = self.array if finite.all() else self.array[finite]  # a copy only when something is not finite
        return {
            "shape": list(self.shape),
            "spacing_mm": [round(float(s), 6) for s in self.spacing],
            "origin_ras_mm": [round(float(s), 6) for s in self.origin],
            "direction_ras": [[round(float(v), 6) for v in row] for row in self.direction],
            "oblique_stack": self.is_oblique_stack,
            "modality": self.modality,
            "intensity_range": [float(values.min()), float(values.max())] if values.size else None,
            "format": self.source.format if self.source else None,
            "series_uid": self.source.series_uid if self.source else None,
            "placeholder_slices": list(self.placeholder_slices),
            "resampled_slices": list(self.resampled_slices),
            "slice_grid": self.slice_grid,
        }


def affine_from_itk(spacing, origin, direction) -> np.ndarray:
    """Build a RAS affine from ITK/SimpleITK's LPS spacing, origin and direction."""
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = d * np.asarray(spacing, dtype=np.float64)
    lps[:3, 3] = origin
    return LPS_TO_RAS @ lps


def itk_geometry(affine: np.ndarray) -> tuple[list[float], list[float], list[float]]:
    """Spacing, origin and (column-normalised) direction in LPS for SimpleITK."""
    lps = LPS_TO_RAS @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing
    return spacing.tolist(), lps[:3, 3].tolist(), direction.flatten().tolist()
