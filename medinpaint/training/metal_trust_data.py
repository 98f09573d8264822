"""Training slices for the learned trust weight: what the metal correction sees, and the metal-free truth.

Each record is one slice holding metal, prepared exactly as ``find_metal_artifacts`` prepares a
real scan (metal found by threshold, halo, the change NMAR would make), with the truth and the
region it is scored in (the body, the metal and a pixel around it excluded), from both
simulators: XCIST cases (``training.xcist``) and our own (``simulate_metal_volume``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from medinpaint.artifacts.metal import MetalDetection, slice_gate
from medinpaint.artifacts.metal_correction import change_batches
from medinpaint.data.volume import Volume
from medinpaint.metal.masks import find_metal
from medinpaint.metal.trust import change_weight, trust_keep_out
from medinpaint.metrics import metal_scored_region
from medinpaint.training.xcist import xcist_volume


def slice_records(damaged: Volume, truth: np.ndarray, true_metal: np.ndarray, settings: MetalDetection | None = None) -> list[dict]:
    """One record per slice of ``damaged`` (i, j, k) holding detected metal: image, change, metal, halo, truth, region
    and gradient_weight (H, W), the slice's noise (HU) and streak evidence. ``truth`` and ``true_metal`` are on the same grid."""
    settings = dataclasses.replace(settings or MetalDetection(), gate="off")
    slices = np.moveaxis(np.nan_to_num(damaged.array, nan=-1024.0), 2, 0)
    metal = find_metal(slices, settings.threshold_hu, settings.min_voxels)
    ks = [int(k) for k in np.flatnonzero(metal.any(axis=(1, 2)))]
    truth, true_metal = np.moveaxis(truth, 2, 0), np.moveaxis(true_metal, 2, 0)
    ring_px = settings.ring_mm / float(min(damaged.spacing[:2]))
    spacing = tuple(float(s) for s in damaged.spacing[:2])
    records = []
    for batch, image, mask, halo, change in change_batches(damaged, slices, metal, ks, settings, "nmar"):
        for k, img, m, h, c in zip(batch, image, mask, halo, change):
            gate = slice_gate(img, m, c, ring_px, settings)
            region = metal_scored_region(truth[k], m | true_metal[k])
            weight = change_weight(img, c, trust_keep_out(m), spacing, settings.trust_window_mm)
            records.append({"image": img, "change": c, "metal": m, "halo": h, "truth": truth[k].astype(np.float32), "region": region,
                            "gradient_weight": weight, "noise_hu": gate["noise_hu"], "evidence": gate["streak_evidence"], "k": k})
    return records


def save_records(records: list[dict], out_dir: Path, name: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for r in records:
        path = out_dir / f"{name}-{r['k']}.npz"
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, **r)
        tmp.replace(path)
        paths.append(path)
    return paths


def xcist_records(cases: Path, out_dir: Path) -> int:
    """Records of the XCIST training cases in ``cases`` (``training.xcist.make_xcist_pairs``), skipping those done."""
    n = 0
    for path in sorted(cases.glob("*.npz")):
        if not (out_dir / f"xcist-{path.stem}-0.npz").exists():
            with np.load(path) as z:
                records = slice_records(xcist_volume(z["damaged"][:, :, None]), z["truth"][:, :, None], (z["metal"] > 0.25)[:, :, None])
            n += len(save_records(records, out_dir, f"xcist-{path.stem}"))
    return n


def own_records(data_dir: Path, count: int, out_dir: Path, seed: int = 5000) -> int:
    """Records of ``count`` cases of our simulator's metal (720 views; 2e5, 5e5 or 2e6 photons) in 3-slice slabs of the
    same training slices as the XCIST cases (``training.xcist.training_slices``), case i drawn from ``seed`` + i."""
    from medinpaint.artifacts.labels import ArtifactKind
    from medinpaint.simulate import simulate_metal_volume
    from medinpaint.training.xcist import training_slices

    slices = training_slices(data_dir, 12)
    n = 0
    for i in range(count):
        rng = np.random.default_rng(seed + i)
        j = i % len(slices)
        stack = np.stack([slices[max(0, j - 1)][1], slices[j][1], slices[min(len(slices) - 1, j + 1)][1]], axis=-1)
        kind, photons = str(rng.choice(["rod", "ball", "irregular", "screw"])), float(rng.choice([2e5, 5e5, 2e6]))
        damaged, labels, reference = simulate_metal_volume(xcist_volume(stack), seed=seed + i, kind=kind, photons=photons, views=720)
        n += len(save_records(slice_records(damaged, reference.array, labels == ArtifactKind.METAL), out_dir, f"own-{i:03d}-{slices[j][0]}"))
    return n


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Make training records for the learned trust weight (training.metal_trust).")
    parser.add_argument("out", type=Path, help="folder for the records")
    parser.add_argument("--xcist-cases", type=Path, help="XCIST training cases (python -m medinpaint.training.xcist DIR)")
    parser.add_argument("--own", type=int, default=0, help="cases of our own simulator on the same training slices")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2].parent / "shared" / "data")
    args = parser.parse_args()
    if args.xcist_cases:
        print(f"{xcist_records(args.xcist_cases, args.out)} XCIST records in {args.out}")
    if args.own:
        print(f"{own_records(args.data, args.own, args.out)} own-simulator records in {args.out}")


if __name__ == "__main__":
    main()
