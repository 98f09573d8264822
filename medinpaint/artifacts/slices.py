"""Find missing, blank and corrupt slices along the acquisition (k) axis.

A corrupt slice is one that its valid neighbours cannot explain: its difference from
their interpolation is far larger than the difference between the neighbours
themselves and than what the other slices of the same scan show.  Flagged slices are
removed one at a time (worst first) so a bad slice never makes its neighbours look bad.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medinpaint.artifacts.labels import ArtifactKind
from medinpaint.data.volume import Volume


@dataclass(frozen=True)
class SliceDetection:
    """Thresholds for slice detection (see configs/inference.yaml)."""

    blank_relative_std: float = 1e-3  # slice std below this fraction of the scan's range: blank
    nan_fraction: float = 0.5  # slices with more non-finite voxels than this are blank
    corrupt_ratio: float = 3.0  # residual / neighbour difference above this ...
    corrupt_zscore: float = 8.0  # ... and robust z-score above this: corrupt
    min_slices_for_corrupt: int = 6
    max_corrupt_fraction: float = 0.25


def find_slice_artifacts(volume: Volume, settings: SliceDetection | None = None) -> dict[int, ArtifactKind]:
    """Map k-index -> kind for every bad slice."""
    settings = settings or SliceDetection()
    array = volume.array
    n_k = array.shape[2]
    found: dict[int, ArtifactKind] = {k: ArtifactKind.MISSING_SLICE for k in volume.placeholder_slices}

    finite = np.isfinite(array)
    step = 2 if array.size > 2**24 else 1  # the scan's range from a strided sample: no full copy
    values = array[::step, ::step][finite[::step, ::step]]
    lo, hi = np.percentile(values, [1, 99]) if values.size else (0.0, 0.0)
    scale = max(float(hi - lo), 1e-6)
    for k in range(n_k):
        if k in found:
            continue
        ok = finite[:, :, k]
        if ok.mean() < 1 - settings.nan_fraction:
            found[k] = ArtifactKind.BLANK_SLICE
        elif float(np.std(array[:, :, k][ok])) < settings.blank_relative_std * scale:
            found[k] = ArtifactKind.BLANK_SLICE

    valid = [k for k in range(n_k) if k not in found]
    if len(valid) >= settings.min_slices_for_corrupt:
        for k in _corrupt_slices(array, valid, settings):
            found[k] = ArtifactKind.CORRUPT_SLICE
    return dict(sorted(found.items()))


def _corrupt_slices(array: np.ndarray, valid: list[int], settings: SliceDetection) -> list[int]:
    stride = max(1, min(array.shape[0], array.shape[1]) // 128)
    small = np.nan_to_num(array[::stride, ::stride, :].astype(np.float64), nan=0.0)
    valid = list(valid)
    flagged: list[int] = []
    max_flags = int(settings.max_corrupt_fraction * len(valid))
    while len(valid) >= settings.min_slices_for_corrupt and len(flagged) < max_flags:
        residual, neighbour_diff = _residuals(small, valid)
        ratio = residual / np.maximum(neighbour_diff, 1e-6 * (np.median(neighbour_diff) + 1e-12))
        median = np.median(residual)
        mad = 1.4826 * np.median(np.abs(residual - median)) + 1e-9 * (abs(median) + 1)
        z = (residual - median) / mad
        suspicious = (ratio > settings.corrupt_ratio) & (z > settings.corrupt_zscore)
        if not suspicious.any():
            break
        worst = int(np.argmax(np.where(suspicious, z, -np.inf)))
        flagged.append(valid.pop(worst))
    return flagged


def _residuals(small: np.ndarray, valid: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per valid slice: mean |slice - prediction from neighbours| and the neighbours' own difference."""
    residual = np.empty(len(valid))
    neighbour_diff = np.empty(len(valid))
    for n, k in enumerate(valid):
        if 0 < n < len(valid) - 1:
            a, b = valid[n - 1], valid[n + 1]
            w = (k - a) / (b - a)
            prediction = (1 - w) * small[:, :, a] + w * small[:, :, b]
            neighbour_diff[n] = np.mean(np.abs(small[:, :, b] - small[:, :, a])) / 2
        else:
            near, far = (valid[1], valid[2]) if n == 0 else (valid[-2], valid[-3])
            prediction = small[:, :, near]
            neighbour_diff[n] = np.mean(np.abs(small[:, :, near] - small[:, :, far]))
        residual[n] = np.mean(np.abs(small[:, :, k] - prediction))
    return residual, neighbour_diff
