"""Fill quality: the network against linear, cubic and registered interpolation on held-out real scans.

Slices are removed (singly, and in runs of 3) from clean scans the shipped model never saw
in training (`ct_abdomen_dicom`) or saw only as one of its sources (`mr_brain_t1.nrrd`),
filled by each method, and scored inside the removed slices and inside the body
(PSNR over the reference's range in the body, SSIM, MAE).  Several placements per case.

    python benchmarks/quality.py [--model NAME_OR_PATH] [--data ../shared/data] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import medinpaint
from medinpaint.artifacts.find import ArtifactMask
from medinpaint.artifacts.labels import ArtifactKind
from medinpaint.config import Settings
from medinpaint.inpaint.classical import interpolate_slices
from medinpaint.inpaint.registered import with_registered_slices
from medinpaint.metrics import masked_metrics

REPO = Path(__file__).resolve().parent.parent
SCANS = {"ct_abdomen_dicom (held out, 2 mm)": "ct_abdomen_dicom", "mr_brain_t1 (6.5 mm)": "mr_brain_t1.nrrd"}


def placements(n_k: int, run: int, gap: int, offset: int) -> list[int]:
    """Runs of ``run`` slices every ``run + gap`` slices, starting at ``2 + offset``: each run has acquired neighbours."""
    starts = range(2 + offset, n_k - 2 - run + 1, run + gap)
    return sorted(k for s in starts for k in range(s, s + run))


def fill(volume, removed: list[int], method: str, model: str | None, settings: Settings) -> np.ndarray:
    if method in ("linear", "cubic"):
        return interpolate_slices(volume.array, removed, order=method)
    if method == "registered":  # motion-compensated interpolation alone (slices-v3 reads it as a second view)
        return with_registered_slices(volume.array.astype(np.float32), volume.array, removed)
    labels = np.zeros(volume.shape, np.uint8)
    labels[:, :, removed] = ArtifactKind.MISSING_SLICE
    artifacts = ArtifactMask.from_labels(labels, volume.affine, sources=["benchmark"])
    damaged = volume.array.copy()
    damaged[:, :, removed] = np.nan  # the network must not see the truth
    return medinpaint.correct(volume.with_array(damaged), artifacts, method="network", model=model, settings=settings).volume.array


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--model", default=None, help="model name or .safetensors (default: the shipped default)")
    parser.add_argument("--offsets", type=int, default=3, help="placements per case")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    settings = Settings()
    results = []
    for label, name in SCANS.items():
        volume = medinpaint.load(args.data / name)
        for run, gap in ((1, 3), (3, 3)):
            scores: dict[str, list[dict]] = {"linear": [], "cubic": [], "registered": [], "network": []}
            for offset in range(args.offsets):
                removed = placements(volume.shape[2], run, gap, offset)
                mask = np.zeros(volume.shape, bool)
                mask[:, :, removed] = True
                for method in scores:
                    started = time.perf_counter()
                    filled = fill(volume, removed, method, args.model, settings)
                    m = masked_metrics(volume.array, filled, mask, volume.modality)
                    m["seconds"] = time.perf_counter() - started
                    scores[method].append(m)
            row = {"scan": label, "missing": "single slices" if run == 1 else f"runs of {run}", "placements": args.offsets}
            for method, ms in scores.items():
                row[method] = {k: float(np.mean([m[k] for m in ms])) for k in ("psnr_db", "ssim", "mae", "seconds")}
            row["network_minus_linear_db"] = row["network"]["psnr_db"] - row["linear"]["psnr_db"]
            results.append(row)
            print(f"{label:34s} {row['missing']:14s} " + "  ".join(
                f"{m}: PSNR {row[m]['psnr_db']:6.2f} dB SSIM {row[m]['ssim']:.4f} MAE {row[m]['mae']:7.2f}" for m in scores
            ) + f"  | network - linear {row['network_minus_linear_db']:+.2f} dB", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
