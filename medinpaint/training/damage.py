"""Random damage for self-supervised training: missing slice runs and 3D holes of many shapes.

``RandDamaged`` is a MONAI dictionary transform: from a clean normalised "image" it makes
"mask" (1 = hole), "slices" (which k-slices are whole holes) and "prefilled" (the
network's input, made by the same pre-fill used at inference).
"""

from __future__ import annotations

import numpy as np
from monai.transforms import MapTransform, Randomizable

from medinpaint.inpaint.classical import network_prefill
from medinpaint.inpaint.registered import with_registered_slices


def slice_damage(n_k: int, rng: np.random.RandomState, max_run: int = 5, margin: int = 2) -> list[int]:
    """One to three runs of 1..max_run whole missing slices, kept off the patch border."""
    bad: set[int] = set()
    for _ in range(rng.randint(1, 4)):
        run = int(rng.randint(1, max_run + 1))
        if n_k - 2 * margin - run <= 0:
            continue
        start = int(rng.randint(margin, n_k - margin - run + 1))
        bad.update(range(start, start + run))
    if not bad:
        bad.add(n_k // 2)
    return sorted(bad)


def hole_damage(shape: tuple[int, int, int], rng: np.random.RandomState) -> np.ndarray:
    """Random ellipsoids, boxes and thin plates/rods of many sizes."""
    mask = np.zeros(shape, dtype=bool)
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    for _ in range(rng.randint(1, 5)):
        centre = [rng.uniform(0.2, 0.8) * s for s in shape]
        radii = [rng.uniform(1.0, 0.3 * s) for s in shape]
        if rng.rand() < 0.3:  # thin along one axis: a plate or partial slice
            radii[rng.randint(3)] = rng.uniform(0.5, 2.0)
        if rng.rand() < 0.5:
            d = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii))
            mask |= d <= 1
        else:
            box = tuple(slice(max(int(c - r), 0), int(c + r) + 1) for c, r in zip(centre, radii))
            mask[box] = True
    return mask


class RandDamaged(MapTransform, Randomizable):
    def __init__(
        self, keys: str = "image", slice_probability: float = 0.6, max_run: int = 5, slice_prefill: str = "linear",
        registered: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys)
        self.slice_prefill = slice_prefill
        self.registered = registered  # also give "registered": the pre-fill with missing slices from registered_slices
        self.slice_probability = slice_probability
        self.max_run = max_run

    def randomize(self, data=None) -> None:  # draws happen in __call__
        pass

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        image = np.asarray(d[self.keys[0]])[0].astype(np.float32)
        shape = image.shape
        slices = np.zeros(shape[2], dtype=bool)
        if self.R.rand() < self.slice_probability:
            bad = slice_damage(shape[2], self.R, self.max_run)
            slices[bad] = True
            mask = np.zeros(shape, dtype=bool)
            mask[:, :, bad] = True
            prefilled = network_prefill(image, bad, np.zeros(shape, dtype=bool), self.slice_prefill)
        else:
            bad = []
            mask = hole_damage(shape, self.R)
            prefilled = network_prefill(image, [], mask)
        if self.registered:
            d["registered"] = with_registered_slices(prefilled, image, bad)[None].astype(np.float32)
        d["image"] = image[None]
        d["mask"] = mask[None].astype(np.float32)
        d["prefilled"] = prefilled[None].astype(np.float32)
        d["slices"] = slices
        return d
