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


TRUE_ARTIFACT_HU = 50.0  # a voxel is damaged by the metal where damaged and reference differ by more


def simulate_metal_volume(
    volume: Volume, seed: int = 0, count: int = 1, kind: str | None = None, photons: float = 2e5, views: int = 720,
    channels: int | None = None,
) -> tuple[Volume, np.ndarray, Volume]:
    """Insert ``count`` metal objects into a clean CT and scan it: (damaged, labels, metal-free reference).

    Every slice that holds metal is forward-projected with a polychromatic 120 kVp spectrum,
    Poisson noise, water beam-hardening correction and fan-beam FBP, once with the metal and
    once without (same noise draws), so damaged and reference differ only by the metal's
    artifacts.  Other slices are left as they are in both.  ``labels`` marks the metal (7) and
    the true artifact (6): voxels where damaged and reference differ by more than 50 HU.
    ``channels`` defaults to a clinical 736 per 720 views.
    """
    import torch

    from medinpaint.artifacts.labels import ArtifactKind
    from medinpaint.artifacts.metal_correction import check_ct
    from medinpaint.metal.fanbeam import FanBeamGeometry
    from medinpaint.body import body_mask
    from medinpaint.metal.simulate import random_metal_volume, simulate_metal

    check_ct(volume)
    if count < 1:
        raise MedinpaintError(f"count must be at least 1, got {count}")
    rng = np.random.default_rng(seed)
    slices = np.moveaxis(np.nan_to_num(volume.array, nan=-1024.0), 2, 0)  # (k, i, j)
    si, sj, sk = (float(s) for s in volume.spacing)
    body = body_mask(slices)
    if not body.any():
        raise MedinpaintError("no body found (nothing above -500 HU); cannot place metal")
    metal = np.zeros(slices.shape, dtype=bool)
    materials = np.full(slices.shape[0], "", dtype=object)
    for _ in range(count):
        mask, material = random_metal_volume(slices.shape, (sk, si, sj), body, rng, kind)
        metal |= mask
        materials[mask.any(axis=(1, 2))] = material  # one material per slice (the last object placed wins)
    ks = [int(k) for k in np.flatnonzero(metal.any(axis=(1, 2)))]
    channels = channels or round(736 * views / 720)
    geometry = FanBeamGeometry(tuple(slices.shape[1:]), (si, sj), n_views=views, n_channels=channels)
    scan = simulate_metal(
        torch.from_numpy(slices[ks].astype(np.float32)), torch.from_numpy(metal[ks]), list(materials[ks]), (si, sj), rng,
        photons=photons, geometry=geometry,
    )
    damaged = volume.array.astype(np.float32, copy=True)
    reference = volume.array.astype(np.float32, copy=True)
    damaged[:, :, ks] = np.moveaxis(scan.damaged.numpy(), 0, 2)
    reference[:, :, ks] = np.moveaxis(scan.reference.numpy(), 0, 2)
    labels = np.zeros(volume.shape, dtype=np.uint8)
    metal_ijk = np.moveaxis(metal, 0, 2)
    labels[(np.abs(damaged - reference) > TRUE_ARTIFACT_HU) & ~metal_ijk] = ArtifactKind.METAL_STREAK
    labels[metal_ijk] = ArtifactKind.METAL
    return volume.with_array(damaged), labels, volume.with_array(reference)
