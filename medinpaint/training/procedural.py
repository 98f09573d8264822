"""Procedurally generated anatomy-like volumes, so the network sees far more than two patients.

A body outline with skin, fat and muscle layers, organs as smooth blobs, branching
vessels as tubes, bones as cortical shells around marrow, optional lungs, blur and noise.
CT volumes are in Hounsfield units; MR volumes map the same tissue classes to random
intensities with a smooth bias field, like a T1 or T2 contrast.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# Tissue classes and their CT values (HU, typical means).
AIR, FAT, MUSCLE, ORGAN, VESSEL, MARROW, CORTEX, LUNG, SKIN = range(9)
ORGAN_BASE = 16
CT_HU = {AIR: -1000, FAT: -100, MUSCLE: 45, ORGAN: 60, VESSEL: 180, MARROW: 250, CORTEX: 1100, LUNG: -850, SKIN: 20}


def _ellipsoid(grid, center, radii, rotation=None):
    coords = [g - c for g, c in zip(grid, center)]
    if rotation is not None:
        coords = [sum(rotation[r, c] * coords[c] for c in range(3)) for r in range(3)]
    return sum((x / r) ** 2 for x, r in zip(coords, radii))


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def tissue_labels(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    grid = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    centre = np.array(shape, dtype=np.float32) / 2 + rng.normal(0, 2, 3)
    labels = np.full(shape, AIR, dtype=np.uint8)
    # Body: an elliptic cylinder along k whose radii wobble slowly with k.
    k = grid[2]
    wobble = 1 + 0.08 * np.sin(k / shape[2] * rng.uniform(2, 6) + rng.uniform(0, 6))
    ri, rj = rng.uniform(0.35, 0.47) * shape[0], rng.uniform(0.28, 0.42) * shape[1]
    body = ((grid[0] - centre[0]) / (ri * wobble)) ** 2 + ((grid[1] - centre[1]) / (rj * wobble)) ** 2
    labels[body < 1.0] = SKIN
    labels[body < (1 - 4 / ri) ** 2] = FAT
    labels[(body < rng.uniform(0.6, 0.85)) & (body > rng.uniform(0.3, 0.5))] = MUSCLE
    inner = body < 0.5
    if rng.random() < 0.4:  # lungs
        for side in (-1, 1):
            d = _ellipsoid(grid, centre + [side * ri * 0.4, 0, 0], [ri * 0.3, rj * 0.5, shape[2] * 0.8])
            labels[(d < 1) & inner] = LUNG
    for n in range(rng.integers(4, 12)):  # organs, each with its own intensity (label ORGAN_BASE + n)
        c = centre + rng.normal(0, 1, 3) * [ri * 0.35, rj * 0.35, shape[2] * 0.3]
        radii = rng.uniform(0.08, 0.35, 3) * [ri, rj, shape[2]]
        labels[(_ellipsoid(grid, c, radii, _random_rotation(rng)) < 1) & (body < 0.6)] = ORGAN_BASE + n
    for _ in range(rng.integers(2, 6)):  # bones: cortical shell around marrow
        c = centre + rng.normal(0, 1, 3) * [ri * 0.4, rj * 0.4, shape[2] * 0.2]
        radii = rng.uniform(0.05, 0.15, 3) * [ri, rj, shape[2] * 4]
        d = _ellipsoid(grid, c, radii, _random_rotation(rng) if rng.random() < 0.5 else None)
        labels[(d < 1) & (body < 0.8)] = CORTEX
        labels[(d < rng.uniform(0.4, 0.7)) & (body < 0.8)] = MARROW
    vessels = _vessels(shape, centre, ri, rj, rng)
    labels[vessels & (body < 0.7)] = VESSEL
    return labels


def _vessels(shape, centre, ri, rj, rng) -> np.ndarray:
    """Random-walk tubes that branch now and then."""
    out = np.zeros(shape, dtype=bool)
    stack = [
        (centre + rng.normal(0, 1, 3) * [ri * 0.3, rj * 0.3, shape[2] * 0.3], rng.normal(size=3), rng.uniform(1.0, 3.5))
        for _ in range(rng.integers(2, 6))
    ]
    points, radii = [], []
    while stack and len(points) < 4000:
        pos, direction, radius = stack.pop()
        direction = direction / np.linalg.norm(direction)
        for _ in range(rng.integers(20, 80)):
            direction = direction + rng.normal(0, 0.25, 3)
            direction /= np.linalg.norm(direction)
            pos = pos + direction
            if not all(0 <= p < s for p, s in zip(pos, shape)):
                break
            points.append(pos.copy())
            radii.append(radius)
            if rng.random() < 0.02 and radius > 1.0:
                stack.append((pos.copy(), rng.normal(size=3), radius * 0.7))
    if not points:
        return out
    seeds = np.zeros(shape, dtype=bool)
    idx = np.round(np.array(points)).astype(int)
    seeds[tuple(np.clip(idx, 0, np.array(shape) - 1).T)] = True
    distance = ndimage.distance_transform_edt(~seeds)
    return distance < float(np.median(radii))


def render_ct(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    values = np.zeros(labels.shape, dtype=np.float32)
    for tissue, hu in CT_HU.items():
        values[labels == tissue] = hu + rng.normal(0, 15 if tissue != CORTEX else 150)
    for tissue in np.unique(labels[labels >= ORGAN_BASE]):
        values[labels == tissue] = rng.uniform(-60, 160)
    texture = ndimage.gaussian_filter(rng.normal(0, 1, labels.shape).astype(np.float32), rng.uniform(1, 3))
    values += texture * rng.uniform(5, 40) * (labels != AIR)
    values = ndimage.gaussian_filter(values, rng.uniform(0.5, 1.2))
    values += rng.normal(0, rng.uniform(5, 25), labels.shape).astype(np.float32)
    return np.clip(values, -1024, 3071).astype(np.float32)


def render_mr(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    means = {t: rng.uniform(0.05, 1.0) for t in CT_HU}
    means[AIR] = rng.uniform(0.0, 0.03)
    means[LUNG] = rng.uniform(0.0, 0.1)
    means[CORTEX] = rng.uniform(0.0, 0.15)
    values = np.zeros(labels.shape, dtype=np.float32)
    for tissue, m in means.items():
        values[labels == tissue] = m
    for tissue in np.unique(labels[labels >= ORGAN_BASE]):
        values[labels == tissue] = rng.uniform(0.1, 1.0)
    grid = np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in labels.shape], indexing="ij")
    bias = 1 + sum(rng.uniform(-0.2, 0.2) * g for g in grid)
    texture = ndimage.gaussian_filter(rng.normal(0, 1, labels.shape).astype(np.float32), rng.uniform(1, 3))
    values = (values + texture * rng.uniform(0.01, 0.06) * (labels != AIR)) * bias
    values = ndimage.gaussian_filter(values, rng.uniform(0.5, 1.2))
    values += np.abs(rng.normal(0, rng.uniform(0.005, 0.03), labels.shape)).astype(np.float32)
    return (values * 1000).astype(np.float32)


def procedural_volume(seed: int, shape=(112, 112, 72), modality: str = "CT") -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = tissue_labels(shape, rng)
    return render_ct(labels, rng) if modality == "CT" else render_mr(labels, rng)
