"""Damage a clean volume in a known way, so a correction can be scored against the truth."""

from __future__ import annotations

import numpy as np

from medinpaint.data.volume import Volume
from medinpaint.errors import MedinpaintError
from medinpaint.training.damage import hole_damage

SIMULATED_ARTIFACTS = ("slices", "holes")


def choose_slices(n_k: int, count: int, run: int, rng: np.random.Generator, margin: int = 2) -> list[int]:
    """``count`` runs of ``run`` consecutive slices, apart from each other and off the ends."""
    starts: list[int] = []
    candidates = list(range(margin, n_k - margin - run + 1))
    rng.shuffle(candidates)
    for start in candidates:
        if all(abs(start - s) > run + 1 for s in starts):
            starts.append(start)
        if len(starts) == count:
            break
    if len(starts) < count:
        raise MedinpaintError(f"cannot place {count} runs of {run} slices in a volume with {n_k} slices")
    return sorted(k for s in starts for k in range(s, s + run))


def simulate(volume: Volume, artifact: str = "slices", seed: int = 0, count: int = 5, run: int = 1) -> tuple[Volume, np.ndarray]:
    """Return (damaged copy, boolean ground-truth mask of the damaged voxels).

    ``slices`` blanks ``count`` runs of ``run`` slices along k (set to the volume's
    minimum, as a scanner dropping a slice would); ``holes`` blanks random 3D holes.
    """
    if artifact not in SIMULATED_ARTIFACTS:
        raise MedinpaintError(f"unknown artifact {artifact!r} for simulate; choose from {', '.join(SIMULATED_ARTIFACTS)}")
    rng = np.random.default_rng(seed)
    array = volume.array.astype(np.float32, copy=True)
    fill = float(np.nanmin(array))
    mask = np.zeros(volume.shape, dtype=bool)
    if artifact == "slices":
        mask[:, :, choose_slices(volume.shape[2], count, run, rng)] = True
    else:
        legacy = np.random.RandomState(int(rng.integers(2**31)))
        while mask.sum() < 0.002 * mask.size:
            mask |= hole_damage(volume.shape, legacy)
    array[mask] = fill
    return volume.with_array(array), mask
