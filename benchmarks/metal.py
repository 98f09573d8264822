"""Metal-artifact correction on a CT that no model saw: uncorrected, LI, NMAR, and medinpaint.

For each configuration, metal is inserted into the held-out `ct_abdomen_dicom` (512 x 512 x 20,
2 mm) and the slices holding it are re-scanned (`medinpaint.simulate.simulate_metal_volume`),
together with their metal-free reference.  Scores: PSNR, SSIM and RMSE in HU over the slices
with metal, inside the body, metal voxels (true or detected) excluded.

Columns:
  uncorrected     the damaged scan
  LI, NMAR        the whole slice replaced by the classical correction as in the literature: the
                  detected metal's trace alone is re-filled
  NMAR_halo       the same with the metal's bright rim re-filled too (metal halo_hu, as `correct`
                  does by default): medinpaint's own classical step, not the literature's
  classical       what `medinpaint correct --method classical` writes: NMAR_halo inside the detected
                  streak region (which holds the rim) only, every other voxel as acquired
  network         what `medinpaint correct` writes: the metal model refines NMAR in the streak region
  noise_hu        the noise of the clean scan and of its simulated re-scan (median local SD in flat
                  soft tissue): how realistic --photons is for this scan
  smoothed_reference  a diagnostic, not a method: the true metal-free slices blurred by a 1-pixel
                  Gaussian inside the detected streak region.  The reference carries the scan's
                  own noise, which no correction can know; when this scores below NMAR, the score
                  is bound by that noise, not by what is left of the streaks

    python benchmarks/metal.py [--configs 4] [--views 720] [--photons 2e5] [--cache DIR] [--model NAME_OR_PATH] [--halo-hu none|HU]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

import medinpaint
from medinpaint.artifacts.find import ArtifactMask, find_artifacts
from medinpaint.artifacts.labels import ArtifactKind
from medinpaint.artifacts.metal import MetalDetection, metal_corrections
from medinpaint.config import Settings
from medinpaint.inpaint.models import DEFAULT_METAL_MODEL, MODELS_DIR
from medinpaint.metal.masks import overlap
from medinpaint.metrics import masked_metrics
from medinpaint.simulate import simulate_metal_volume

REPO = Path(__file__).resolve().parent.parent
CONFIGS = [("ball", 0), ("screw", 2), ("irregular", 3), ("ball", 4), ("rod", 1), ("screw", 6), ("irregular", 7), ("rod", 5)]


def soft_tissue_noise_hu(hu_slices: np.ndarray) -> float | None:
    """Median local standard deviation (7x7 pixels) in flat soft tissue: the noise level of a scan.

    Flat soft tissue: 15x15 neighbourhoods entirely within -20..150 HU.  None where there is none,
    as at a noise level so high that no neighbourhood stays in that window.
    """
    values = []
    for k in range(hu_slices.shape[2]):
        img = hu_slices[:, :, k].astype(np.float64)
        mean, mean_sq = ndimage.uniform_filter(img, 7), ndimage.uniform_filter(img * img, 7)
        local_sd = np.sqrt(np.maximum(mean_sq - mean * mean, 0))
        flat = ndimage.uniform_filter(((img > -20) & (img < 150)).astype(np.float64), 15) > 0.99
        values.append(local_sd[flat])
    values = np.concatenate(values)
    return round(float(np.median(values)), 1) if values.size else None


def score(reference, corrected, region) -> dict:
    m = masked_metrics(reference, corrected, region, "CT")
    return {"psnr_db": m["psnr_db"], "ssim": m["ssim"], "rmse_hu": m["rmse"]}


def load_case(path: Path, clean) -> tuple:
    """A cached case: damaged, reference, true labels and the detection kept with it."""
    with np.load(path) as saved:
        found = ArtifactMask(saved["found"], clean.affine, sources=["cache"],
                             metal_corrected={int(k): s for k, s in zip(saved["ks"], saved["corrected"])})
        if "damaged" not in saved:
            return None, None, None, found
        return clean.with_array(saved["damaged"]), clean.with_array(saved["reference"]), saved["labels"], found


def save_case(path: Path, found: ArtifactMask, **arrays) -> None:
    ks = sorted(found.metal_corrected)
    corrected = np.stack([found.metal_corrected[k] for k in ks]) if ks else np.zeros((0,) + found.labels.shape[:2], np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, found=found.labels, ks=np.array(ks, int), corrected=corrected, **arrays)


def whole_slices(damaged, corrected: dict[int, np.ndarray]) -> np.ndarray:
    """Every slice with metal replaced by its classical correction (whole slices, as the literature scores LI and NMAR)."""
    out = damaged.array.copy()
    for k, s in corrected.items():
        out[:, :, k] = s
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--configs", type=int, default=4, help=f"how many metal configurations (at most {len(CONFIGS)})")
    parser.add_argument("--views", type=int, default=720, help="views of the simulated scan (736 channels at 720)")
    parser.add_argument("--count", type=int, default=1, help="metal objects per configuration")
    parser.add_argument("--photons", type=float, default=2e5, help="unattenuated photons per ray (the noise level; default 2e5)")
    parser.add_argument("--cache", type=Path, help="keep simulated cases and their detection here (reused when present)")
    parser.add_argument("--halo-hu", default="default",
                        help="detection's metal halo_hu for classical and network: default (as `correct`), none, or a number of HU")
    parser.add_argument("--model", help=f"the metal model: a shipped name or a .safetensors file (default {DEFAULT_METAL_MODEL})")
    args = parser.parse_args()
    clean = medinpaint.load(args.data / "ct_abdomen_dicom")
    literature = MetalDetection(halo_hu=None)  # LI and NMAR as published: the metal's trace alone
    metal_settings = MetalDetection() if args.halo_hu == "default" else MetalDetection(halo_hu=None if args.halo_hu == "none" else float(args.halo_hu))
    settings = Settings(metal=metal_settings)  # detection and re-projection as `correct` does them
    has_network = args.model is not None or (MODELS_DIR / f"{DEFAULT_METAL_MODEL}.safetensors").is_file()
    rows, totals = [], {}
    for kind, seed in CONFIGS[: args.configs]:
        noise = "" if args.photons == 2e5 else f"-{args.photons:g}photons"
        cached = args.cache / f"{kind}-{seed}-{args.count}x-{args.views}views{noise}.npz" if args.cache else None
        started = time.perf_counter()
        if cached and cached.exists():
            damaged, reference, labels, found_lit = load_case(cached, clean)
        else:
            damaged, labels, reference = simulate_metal_volume(clean, seed=seed, count=args.count, kind=kind, views=args.views,
                                                               photons=args.photons)
            found_lit = find_artifacts(damaged, artifacts="metal", metal_settings=literature)
            if cached:
                save_case(cached, found_lit, damaged=damaged.array, reference=reference.array, labels=labels)
        found = found_lit
        if metal_settings.halo_hu is not None:
            halo_cached = cached.with_name(f"{cached.stem}-halo{metal_settings.halo_hu:g}-{metal_settings.halo_px}px.npz") if cached else None
            if halo_cached and halo_cached.exists():
                found = load_case(halo_cached, clean)[3]
            else:
                found = find_artifacts(damaged, artifacts="metal", metal_settings=metal_settings)
                if halo_cached:
                    save_case(halo_cached, found)
        simulated = time.perf_counter() - started
        true_metal = labels == ArtifactKind.METAL
        metal = true_metal | (found.labels == ArtifactKind.METAL)
        ks = sorted(set(np.flatnonzero(true_metal.any(axis=(0, 1))).tolist()))
        region = np.zeros(clean.shape, bool)
        region[:, :, ks] = True
        region &= ~metal
        streak_mask = found.labels == ArtifactKind.METAL_STREAK
        true_artifact = labels == ArtifactKind.METAL_STREAK

        detected = found_lit.labels == ArtifactKind.METAL
        li = whole_slices(damaged, metal_corrections(damaged, detected, sorted(found_lit.metal_corrected), literature, method="li"))
        results = {
            "uncorrected": score(reference.array, damaged.array, region),
            "LI": score(reference.array, li, region),
            "NMAR": score(reference.array, whole_slices(damaged, found_lit.metal_corrected), region),
        }
        if metal_settings.halo_hu is not None:
            results["NMAR_halo"] = score(reference.array, whole_slices(damaged, found.metal_corrected), region)
        results["classical"] = score(reference.array, medinpaint.correct(damaged, found, method="classical", settings=settings).volume.array, region)
        smoothed = damaged.array.copy()
        for k in ks:
            blurred = ndimage.gaussian_filter(reference.array[:, :, k], 1.0)
            smoothed[:, :, k][streak_mask[:, :, k]] = blurred[streak_mask[:, :, k]]
        results["smoothed_reference"] = score(reference.array, smoothed, region)
        if has_network:
            t = time.perf_counter()
            results["network"] = score(reference.array, medinpaint.correct(damaged, found, settings=settings, metal_model=args.model).volume.array, region)
            results["network_seconds"] = round(time.perf_counter() - t, 1)
        row = {
            "config": f"{kind} seed {seed}",
            "slices_with_metal": len(ks),
            "metal_voxels": int(true_metal.sum()),
            "streak_mask_vs_true_artifact": {k: round(v, 3) for k, v in overlap(streak_mask, true_artifact).items()},
            # the noise of the scan as acquired against that of the simulated re-scan (the reference)
            "noise_hu": {"scan": soft_tissue_noise_hu(clean.array[:, :, ks]), "reference": soft_tissue_noise_hu(reference.array[:, :, ks])},
            "simulate_and_detect_seconds": round(simulated, 1),
        } | results
        rows.append(row)
        print(json.dumps(row), flush=True)
        for method, value in results.items():
            if isinstance(value, dict):
                for key, number in value.items():
                    totals.setdefault(method, {}).setdefault(key, []).append(number)
    summary = {method: {key: round(float(np.mean(v)), 4) for key, v in values.items()} for method, values in totals.items()}
    if not has_network:
        summary["network"] = f"not run: no {DEFAULT_METAL_MODEL} model shipped"
    print(json.dumps({"mean_over_configs": summary}, indent=2))


if __name__ == "__main__":
    main()
