"""``find_artifacts``: a labelled artifact mask on the volume's own grid."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medinpaint.artifacts.labels import LABEL_NAMES, ArtifactKind
from medinpaint.artifacts.metal import MetalDetection, find_metal_artifacts
from medinpaint.artifacts.slices import SliceDetection, find_slice_artifacts
from medinpaint.data.load import load
from medinpaint.data.volume import Volume
from medinpaint.errors import MedinpaintError

ARTIFACT_CHOICES = ("auto", "slices", "metal", "none")


@dataclass
class ArtifactMask:
    """Labels (uint8, values from ArtifactKind, 0 = fine) on the grid of ``volume``."""

    labels: np.ndarray
    affine: np.ndarray
    bad_slices: dict[int, ArtifactKind] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)  # what produced the mask
    metal_corrected: dict[int, np.ndarray] = field(default_factory=dict)  # k -> NMAR/LI slice (HU) where there is metal
    resampled_slices: tuple[int, ...] = ()  # slices interpolated at load time: flagged, kept, never refilled
    metal_gate: dict[int, dict] = field(default_factory=dict)  # k -> the metal gate's decision and its measured evidence

    @property
    def synthesized(self) -> np.ndarray:
        """Boolean mask of the voxels that are not measured (everything flagged but kept metal)."""
        return (self.labels > 0) & (self.labels != ArtifactKind.METAL)

    @property
    def to_fill(self) -> np.ndarray:
        """Boolean mask of the voxels the filler replaces: the synthesized ones but resampled slices."""
        return self.synthesized & (self.labels != ArtifactKind.RESAMPLED_SLICE)

    @classmethod
    def from_labels(cls, labels: np.ndarray, affine: np.ndarray, sources: list[str]) -> "ArtifactMask":
        """Rebuild from a written label map: a slice entirely of one whole-slice kind is a bad slice."""
        labels = np.asarray(labels).astype(np.uint8)
        bad = {}
        resampled = []
        for k in range(labels.shape[2]):
            value = int(labels[0, 0, k])
            if value in LABEL_NAMES and ArtifactKind(value).whole_slice and (labels[:, :, k] == value).all():
                bad[k] = ArtifactKind(value)
            elif value == ArtifactKind.RESAMPLED_SLICE and (labels[:, :, k] == value).all():
                resampled.append(k)
        return cls(labels=labels, affine=np.asarray(affine, dtype=np.float64), bad_slices=bad, sources=sources,
                   resampled_slices=tuple(resampled))

    def counts(self) -> dict[str, int]:
        values, counts = np.unique(self.labels[self.labels > 0], return_counts=True)
        return {LABEL_NAMES[int(v)]: int(c) for v, c in zip(values, counts)}

    def summary(self) -> dict:
        total = self.labels.size
        out = {
            "bad_slices": {str(k): v.name.lower() for k, v in self.bad_slices.items()},
            "voxels": {name: {"count": c, "fraction": c / total} for name, c in self.counts().items()},
            "found_by": self.sources,
        }
        if self.resampled_slices:
            out["resampled_slices"] = list(self.resampled_slices)
        if self.metal_gate:  # per slice with metal: corrected, or "kept as acquired, streak evidence below threshold"
            out["metal_gate"] = {str(k): v for k, v in sorted(self.metal_gate.items())}
        return out


def find_artifacts(
    volume: Volume,
    artifacts: str = "auto",
    user_mask: str | Path | np.ndarray | None = None,
    slice_settings: SliceDetection | None = None,
    metal_settings: MetalDetection | None = None,
    progress: bool = False,
) -> ArtifactMask:
    """Detect what is broken.  A user mask replaces detection of everything but missing slices.

    Missing slices (placeholders inserted by the loader) are always flagged: they carry no
    data whatever the user asks, so they must be synthesized or the output is a lie.  Resampled
    slices (interpolated by the loader onto the regular grid) are always flagged too, and kept.
    ``auto`` looks for bad slices and, in a CT, for metal; metal itself is labelled but never replaced.
    """
    if artifacts not in ARTIFACT_CHOICES:
        raise MedinpaintError(f"unknown artifact kind {artifacts!r}; choose from {', '.join(ARTIFACT_CHOICES)}")
    labels = np.zeros(volume.shape, dtype=np.uint8)
    bad: dict[int, ArtifactKind] = {}
    sources: list[str] = []

    if user_mask is not None:
        mask = _user_mask_array(user_mask, volume)
        labels[mask] = ArtifactKind.USER_MASK
        sources.append("user mask")
        bad = {k: ArtifactKind.MISSING_SLICE for k in volume.placeholder_slices}
    elif artifacts in ("auto", "slices"):
        bad = find_slice_artifacts(volume, slice_settings)
        sources.append("slice detection")
    elif volume.placeholder_slices:
        bad = {k: ArtifactKind.MISSING_SLICE for k in volume.placeholder_slices}
        sources.append("missing slice positions")

    for k, kind in bad.items():
        labels[:, :, k] = kind
    # Not measured: flagged whatever the user asks.  A resampled slice that detection found bad
    # (e.g. blank because a slice it came from is), the user's mask and non-finite voxels in it
    # keep their own labels and are filled instead.
    resampled = tuple(k for k in volume.resampled_slices if k not in bad)
    for k in resampled:
        plane = labels[:, :, k]
        plane[(plane == 0) & np.isfinite(volume.array[:, :, k])] = ArtifactKind.RESAMPLED_SLICE
    if resampled:
        sources.append("slice positions resampled onto the regular grid")
    corrected: dict[int, np.ndarray] = {}
    gate: dict[int, dict] = {}
    if user_mask is None and (artifacts == "metal" or (artifacts == "auto" and volume.modality == "CT")):
        found = find_metal_artifacts(volume, metal_settings, skip_slices=set(bad) | set(resampled), progress=progress,
                                     required=artifacts == "metal")
        gate = found.gate
        if found.metal.any():
            labels[found.metal & (labels == 0)] = ArtifactKind.METAL
            labels[found.streaks & (labels == 0)] = ArtifactKind.METAL_STREAK
            corrected = found.corrected
            sources.append(f"metal threshold, {found.method.upper()} change and streak gate")
    invalid = ~np.isfinite(volume.array) & (labels == 0)
    if invalid.any():
        labels[invalid] = ArtifactKind.INVALID_VOXEL
        sources.append("non-finite voxels")
    return ArtifactMask(labels=labels, affine=volume.affine.copy(), bad_slices=bad, sources=sources, metal_corrected=corrected,
                        resampled_slices=resampled, metal_gate=gate)


def _user_mask_array(user_mask, volume: Volume) -> np.ndarray:
    if isinstance(user_mask, np.ndarray):
        if user_mask.shape != volume.shape:
            raise MedinpaintError(f"mask shape {user_mask.shape} does not match the volume {volume.shape}")
        return user_mask > 0
    mask_volume = load(user_mask)
    if mask_volume.shape != volume.shape:
        raise MedinpaintError(
            f"{user_mask}: mask shape {mask_volume.shape} does not match the volume {volume.shape}"
        )
    if not np.allclose(mask_volume.affine, volume.affine, atol=1e-3):
        raise MedinpaintError(f"{user_mask}: mask geometry (origin, spacing or direction) differs from the volume")
    return np.nan_to_num(mask_volume.array) > 0
