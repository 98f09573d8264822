"""Per-modality intensity normalisation, exactly invertible, so the network sees one range.

CT: Hounsfield units clipped to [-1024, 3071] and scaled so air is 0 and water 1.
MR (arbitrary units): divided by the 99.5th percentile of the valid voxels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

CT_RANGE = (-1024.0, 3071.0)


@dataclass(frozen=True)
class Normalizer:
    offset: float
    scale: float
    clip: tuple[float, float] | None = None

    @classmethod
    def for_volume(cls, array: np.ndarray, modality: str, holes: np.ndarray | None = None) -> "Normalizer":
        """``holes`` (same grid) are left out of the MR percentiles."""
        if modality == "CT":
            return cls(offset=-1024.0, scale=1024.0, clip=CT_RANGE)
        # A strided sample (every voxel of scans up to ~16 M voxels) keeps the percentiles and
        # spares a full copy of a large scan (and of its mask: the sample is taken first).
        step = math.ceil(math.sqrt(array.size / 2**24))
        sample = array[::step, ::step]
        values = sample[~holes[::step, ::step]] if holes is not None else sample.ravel()
        values = values[np.isfinite(values)]
        high = float(np.percentile(values, 99.5)) if values.size else 1.0
        low = float(min(0.0, np.percentile(values, 0.5))) if values.size else 0.0
        return cls(offset=low, scale=max(high - low, 1e-6))

    def forward(self, array: np.ndarray) -> np.ndarray:
        if self.clip is not None:
            array = np.clip(array, *self.clip)
        return ((array - self.offset) / self.scale).astype(np.float32)

    def inverse(self, array: np.ndarray) -> np.ndarray:
        return (array * self.scale + self.offset).astype(np.float32)
