"""Simulated metal-artifact training pairs from clean CT, made once and cached as .npz files.

Each pair is a stack of slices re-scanned with inserted metal (``simulate_metal_volume``) and
prepared exactly as ``correct`` prepares a real scan: metal and streak region detected from the
damaged image alone, NMAR written into the streak region.  The network learns to turn that
input into the metal-free reference scan.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from monai.transforms import MapTransform
from scipy import ndimage
from tqdm import tqdm

from medinpaint.artifacts.find import find_artifacts
from medinpaint.artifacts.labels import ArtifactKind
from medinpaint.artifacts.metal import MetalDetection
from medinpaint.config import Settings
from medinpaint.correct import correct
from medinpaint.data.load import load
from medinpaint.data.volume import Volume
from medinpaint.errors import MedinpaintError
from medinpaint.inpaint.normalize import Normalizer
from medinpaint.simulate import simulate_metal_volume


def pair_sources(paths: tuple[str, ...], pixel_mm: float) -> list[Volume]:
    """Clean CTs resampled in-plane to ``pixel_mm`` (k untouched), with metal they already hold cut away."""
    sources = []
    for path in paths:
        volume = load(path, modality="CT")
        array = np.nan_to_num(volume.array, nan=-1024.0)
        zoom = [s / pixel_mm for s in volume.spacing[:2]] + [1.0]
        if any(abs(z - 1) > 1e-3 for z in zoom):
            array = ndimage.zoom(array, zoom, order=1)
        keep = ~(array > 2000).any(axis=(0, 1))  # slices with real metal (or near it) cannot be a clean reference
        runs = np.split(np.flatnonzero(keep), np.flatnonzero(np.diff(np.flatnonzero(keep)) > 1) + 1)
        longest = max(runs, key=len)
        affine = volume.affine.copy()
        affine[:3, :2] = affine[:3, :2] / np.array(zoom[:2])
        sources.append(Volume(np.ascontiguousarray(array[:, :, longest]).astype(np.float32), affine, modality="CT"))
    return sources


def make_pairs(
    sources: list[Volume], count: int, out_dir: Path, seed: int, views: int, slab: int = 16, progress: bool = True,
    photons: float = 2e5, halo_hu: float | None = None,
) -> list[Path]:
    """Write ``count`` pairs (skipping those already there, so an interrupted run resumes)."""
    if not sources:
        raise MedinpaintError("metal training needs clean CT sources (data.ct)")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"pair-{n:04d}.npz" for n in range(count)]
    for n, path in enumerate(tqdm(paths, desc="simulating metal pairs", unit="pair", disable=not progress)):
        if not path.exists():
            make_pair(sources, n, path, seed, views, slab, photons, halo_hu)
    return paths


def make_pair(
    sources: list[Volume], n: int, path: Path, seed: int, views: int, slab: int = 16, photons: float = 2e5, halo_hu: float | None = None,
) -> None:
    """Pair number ``n``, the same for the same seed whichever process makes it (written atomically).

    ``halo_hu``: detection as `correct` does it with that metal ``halo_hu`` (None: the metal's trace
    alone, as the shipped metal models were trained).
    """
    rng = np.random.default_rng([seed, n])
    source = sources[int(rng.integers(len(sources)))]
    start = int(rng.integers(0, max(source.shape[2] - slab, 0) + 1))
    volume = source.slab(start, min(start + slab, source.shape[2]))
    damaged, _, reference = simulate_metal_volume(
        volume, seed=int(rng.integers(2**31)), count=int(rng.integers(1, 3)), views=views, photons=photons,
    )
    # Detection and correction as `correct` does them, with the do-no-harm gate off: a training pair
    # teaches the refinement of a correction, so every slice with metal must carry one.
    settings = MetalDetection(halo_hu=halo_hu, gate="off")
    found = find_artifacts(damaged, artifacts="metal", metal_settings=settings)
    streaks = found.labels == ArtifactKind.METAL_STREAK
    prefilled = correct(damaged, found, method="classical", settings=Settings(metal=settings)).volume.array  # NMAR in the streaks
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, reference=reference.array, prefilled=prefilled, mask=streaks,
                        metal=found.labels == ArtifactKind.METAL, damaged=damaged.array)
    tmp.replace(path)


class LoadMetalPair(MapTransform):
    """Read one cached pair, normalised like CT at inference: image (target), prefilled, mask,
    and with ``original`` the damaged scan as the network would read it."""

    def __init__(self, original: bool = False) -> None:
        super().__init__(keys="path")
        self.original = original

    def __call__(self, item: dict) -> dict:
        with np.load(item["path"]) as pair:
            normalizer = Normalizer.for_volume(pair["reference"], "CT")
            out = {
                "image": normalizer.forward(pair["reference"])[None],
                "prefilled": normalizer.forward(pair["prefilled"])[None],
                "mask": pair["mask"].astype(np.float32)[None],
                "name": str(item["path"]),
            }
            if self.original:
                if "damaged" not in pair:
                    raise MedinpaintError(f"{item['path']}: made before pairs kept the damaged scan; delete the pairs folder to remake it")
                out["original"] = normalizer.forward(pair["damaged"])[None]
            return out
