"""Artifact kinds and their label values in the written masks (stable: files depend on them)."""

from __future__ import annotations

from enum import IntEnum


class ArtifactKind(IntEnum):
    MISSING_SLICE = 1  # absent from the acquisition; a placeholder on the regular grid
    BLANK_SLICE = 2  # constant, empty or NaN slice
    CORRUPT_SLICE = 3  # statistics break from the neighbouring slices
    USER_MASK = 4  # region given by the user
    INVALID_VOXEL = 5  # NaN or infinite voxels outside blank slices
    METAL_STREAK = 6  # streaks around metal (filled)
    METAL = 7  # the metal itself: found, kept, never synthesized
    RESAMPLED_SLICE = 8  # a grid position between acquired slices: interpolated from them when loaded, kept, flagged

    @property
    def synthesized(self) -> bool:
        """Whether voxels of this kind are not measured ones (flagged in the synthesized mask)."""
        return self is not ArtifactKind.METAL

    @property
    def filled(self) -> bool:
        """Whether the filler replaces voxels of this kind (resampled slices keep the loader's interpolation)."""
        return self.synthesized and self is not ArtifactKind.RESAMPLED_SLICE

    @property
    def whole_slice(self) -> bool:
        return self in (ArtifactKind.MISSING_SLICE, ArtifactKind.BLANK_SLICE, ArtifactKind.CORRUPT_SLICE)


LABEL_NAMES = {int(k): k.name.lower() for k in ArtifactKind}
