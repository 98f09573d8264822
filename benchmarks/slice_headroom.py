"""How far a slice target is from what blending the classical fills could ever reach.

For each removed slice, the best affine blend of the linear, registered and Gaussian-blurred
registered fills is fitted *to the truth* by least squares: an oracle no method has, so its
score bounds what any per-slice blend of these fills can score.  Placements and scores are those
of ``benchmarks/quality.py``.

    python benchmarks/slice_headroom.py [--scan mr_brain_t1.nrrd] [--run 3] [--data ../shared/data]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from quality import REPO, placements
from scipy.ndimage import gaussian_filter

import medinpaint
from medinpaint.inpaint.classical import interpolate_slices
from medinpaint.inpaint.registered import with_registered_slices
from medinpaint.metrics import masked_metrics

BLUR_PX = (1, 2, 4)  # in-plane sigmas of the blurred registered fills the oracle may use


def oracle_blend(truth: np.ndarray, fills: list[np.ndarray], removed: list[int]) -> np.ndarray:
    """Each removed slice replaced by the least-squares affine blend of ``fills`` that best matches ``truth``."""
    out = fills[0].copy()
    for k in removed:
        columns = np.stack([f[:, :, k].ravel() for f in fills] + [np.ones(truth[:, :, k].size)], axis=1)
        weights, *_ = np.linalg.lstsq(columns, truth[:, :, k].ravel().astype(np.float64), rcond=None)
        out[:, :, k] = (columns @ weights).reshape(truth.shape[:2])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--scan", default="mr_brain_t1.nrrd")
    parser.add_argument("--run", type=int, default=3, help="missing slices per run (quality.py uses 1 and 3)")
    parser.add_argument("--offsets", type=int, default=3, help="placements")
    args = parser.parse_args()
    volume = medinpaint.load(args.data / args.scan)
    scores: dict[str, list[float]] = {}
    for offset in range(args.offsets):
        removed = placements(volume.shape[2], args.run, 3, offset)
        mask = np.zeros(volume.shape, bool)
        mask[:, :, removed] = True
        linear = interpolate_slices(volume.array, removed, order="linear")
        registered = with_registered_slices(linear, volume.array, removed)
        blurred = [registered.copy() for _ in BLUR_PX]
        for copy, sigma in zip(blurred, BLUR_PX):
            for k in removed:
                copy[:, :, k] = gaussian_filter(registered[:, :, k], sigma)
        candidates = {
            "linear": linear,
            "registered": registered,
            "oracle blend of linear and registered": oracle_blend(volume.array, [linear, registered], removed),
            "oracle blend of linear, registered and blurred registered": oracle_blend(
                volume.array, [linear, registered, *blurred], removed),
        }
        for name, filled in candidates.items():
            scores.setdefault(name, []).append(masked_metrics(volume.array, filled, mask, volume.modality)["psnr_db"])
    for name, values in scores.items():
        print(f"{args.scan} runs of {args.run}: {name:58s} PSNR {np.mean(values):6.2f} dB")


if __name__ == "__main__":
    main()
