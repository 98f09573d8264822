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

    @property
    def synthesized(self) -> bool:
        """Whether voxels of this kind are replaced by the filler."""
        return self is not ArtifactKind.METAL

    @property
    def whole_slice(self) -> bool:
        return self in (ArtifactKind.MISSING_SLICE, ArtifactKind.BLANK_SLICE, ArtifactKind.CORRUPT_SLICE)


LABEL_NAMES = {int(k): k.name.lower() for k in ArtifactKind}
