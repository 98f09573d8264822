"""Fill quality: what `correct` writes against the best classical fill, on real and resampled scans.

Slices are removed (singly, and in runs of 3) from clean scans, filled by linear, cubic and
registered (motion-compensated) interpolation, by the network alone (gate off), and by the
gated default (what `correct` writes: the network only where the scan's own left-out slices
say it beats the best classical fill; with --adapt, after adapting a copy to the scan), and
scored inside the removed slices and the body (PSNR over the reference's range in the body,
SSIM, MAE).  Gains are over the *best* classical fill of each row (chosen with the truth, so
a hard target).  Cases: `ct_abdomen_dicom` (held out by every shipped model, 2 mm),
`mr_brain_t1` (6.5 mm, a training source), `ct_abdomen_3mm` down-sampled by 2 along the
slices and cubic up-sampled back (a resampled volume, where cubic nearly reproduces it), and
the GE head CT `ct_head_ge_variable_spacing` (no model saw it; its longest run of acquired
slices on the loader's grid: 14 slices of 4 mm, with gantry tilt).

    python benchmarks/quality.py [--model NAME_OR_PATH] [--adapt off|auto|N] [--config SETTINGS.yaml] [--crop 192] [--offsets 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

import medinpaint
from medinpaint.artifacts.find import ArtifactMask
from medinpaint.artifacts.labels import ArtifactKind
from medinpaint.config import Settings, load_settings
from medinpaint.data.volume import Volume
from medinpaint.inpaint.classical import interpolate_slices
from medinpaint.inpaint.registered import with_registered_slices
from medinpaint.metrics import masked_metrics

REPO = Path(__file__).resolve().parent.parent
SCANS = {  # label: (file, resampled by this factor, keep only the longest run of acquired slices)
    "ct_abdomen_dicom (held out, 2 mm)": ("ct_abdomen_dicom", None, False),
    "mr_brain_t1 (6.5 mm)": ("mr_brain_t1.nrrd", None, False),
    "ct_abdomen_3mm resampled (6 mm -> 3 mm, cubic)": ("ct_abdomen_3mm.nii.gz", 2, False),
    "ct_head_ge (unseen, 4 mm, tilted)": ("ct_head_ge_variable_spacing", None, True),
}
CLASSICAL = ("linear", "cubic", "registered")


def placements(n_k: int, run: int, gap: int, offset: int) -> list[int]:
    """Runs of ``run`` slices every ``run + gap`` slices, starting at ``2 + offset``: each run has acquired neighbours."""
    starts = range(2 + offset, n_k - 2 - run + 1, run + gap)
    return sorted(k for s in starts for k in range(s, s + run))


def resampled(volume, factor: int):
    """Every ``factor``-th slice, cubic (spline) up-sampled back to the original grid: a volume made from thicker slices."""
    thick = volume.array[:, :, ::factor].astype(np.float32)
    up = ndimage.zoom(thick, (1, 1, volume.shape[2] / thick.shape[2]), order=3)[:, :, : volume.shape[2]]
    return volume.with_array(up.astype(np.float32))


def crop(volume, size: int | None):
    if not size:
        return volume
    i0, j0 = ((n - min(size, n)) // 2 for n in volume.shape[:2])
    array = volume.array[i0 : i0 + size, j0 : j0 + size].astype(np.float32)
    affine = volume.affine.copy()
    affine[:3, 3] = affine[:3, :3] @ np.array([i0, j0, 0]) + affine[:3, 3]
    return Volume(array, affine, modality=volume.modality)


def corrected(volume, removed: list[int], model: str | None, settings: Settings, gate: bool, adapt: str):
    labels = np.zeros(volume.shape, np.uint8)
    labels[:, :, removed] = ArtifactKind.MISSING_SLICE
    artifacts = ArtifactMask.from_labels(labels, volume.affine, sources=["benchmark"])
    damaged = volume.array.copy()
    damaged[:, :, removed] = np.nan  # the fill must not see the truth
    return medinpaint.correct(volume.with_array(damaged), artifacts, method="network", model=model, settings=settings,
                              gate=gate, adapt=adapt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--model", default=None, help="model name or .safetensors (default: the shipped default)")
    parser.add_argument("--adapt", default="off", help="adaptation of the gated default: off, auto or steps (default off)")
    parser.add_argument("--offsets", type=int, default=2, help="placements per case")
    parser.add_argument("--crop", type=int, default=None, help="in-plane centre crop (pixels) to save CPU time")
    parser.add_argument("--cases", default=None, help="comma-separated substrings of the case labels to run")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--config", type=Path, help="settings YAML for the gated default (as correct --config)")
    args = parser.parse_args()
    settings = load_settings(args.config)
    results = []
    for label, (name, factor, acquired_only) in SCANS.items():
        if args.cases and not any(c in label for c in args.cases.split(",")):
            continue
        volume = medinpaint.load(args.data / name)
        volume = crop(volume.acquired_run() if acquired_only else volume, args.crop)
        if factor:
            volume = resampled(volume, factor)
        for run, gap in ((1, 3), (3, 3)):
            scores: dict[str, list[dict]] = {m: [] for m in CLASSICAL + ("network", "gated default")}
            decisions, adapt_seconds, adapt_scores, gate_seconds = [], [], [], []
            for offset in range(args.offsets):
                removed = placements(volume.shape[2], run, gap, offset)
                mask = np.zeros(volume.shape, bool)
                mask[:, :, removed] = True
                fills = {}
                for method in CLASSICAL:
                    started = time.perf_counter()
                    if method == "registered":
                        fills[method] = with_registered_slices(volume.array.astype(np.float32), volume.array, removed)
                    else:
                        fills[method] = interpolate_slices(volume.array, removed, order=method)
                    fills[method] = (fills[method], time.perf_counter() - started)
                gated = corrected(volume, removed, args.model, settings, gate=True, adapt=args.adapt)
                record = gated.parameters["slice_gate"]
                decisions.append(record["choice"])
                gate_seconds.append(record["seconds"])
                if "adaptation" in record:
                    adapt_seconds.append(record["adaptation"].get("seconds", 0.0))
                    adapt_scores.append((record["adaptation"].get("left_out_psnr_before_db"), record["adaptation"].get("left_out_psnr_after_db")))
                fills["gated default"] = (gated.volume.array, gated.seconds)
                if record["choice"] == "network" and args.adapt == "off":  # the gate wrote the network's fill itself
                    fills["network"] = fills["gated default"]
                else:
                    alone = corrected(volume, removed, args.model, settings, gate=False, adapt="off")
                    fills["network"] = (alone.volume.array, alone.seconds)
                for method, (filled, seconds) in fills.items():
                    m = masked_metrics(volume.array, filled, mask, volume.modality)
                    m["seconds"] = seconds
                    scores[method].append(m)
            row = {"scan": label, "missing": "single slices" if run == 1 else f"runs of {run}", "placements": args.offsets,
                   "shape": list(volume.shape), "gate_choices": decisions, "adapt": args.adapt}
            for method, ms in scores.items():
                row[method] = {k: float(np.mean([m[k] for m in ms])) for k in ("psnr_db", "ssim", "mae", "seconds")}
            best = max(CLASSICAL, key=lambda m: row[m]["psnr_db"])
            row["best_classical"] = best
            row["network_minus_best_classical_db"] = row["network"]["psnr_db"] - row[best]["psnr_db"]
            row["gated_minus_best_classical_db"] = row["gated default"]["psnr_db"] - row[best]["psnr_db"]
            row["gate_seconds"] = float(np.mean(gate_seconds))  # the gate's own measurement (picks, rounds, decision)
            if adapt_seconds:
                row["adaptation_seconds"] = float(np.mean(adapt_seconds))
                row["adaptation_left_out_psnr_before_after_db"] = adapt_scores  # the gate's picks, per placement
            results.append(row)
            print(f"{label:48s} {row['missing']:14s} " + "  ".join(
                f"{m}: {row[m]['psnr_db']:6.2f} dB" for m in scores
            ) + f"  | best classical {best}; network {row['network_minus_best_classical_db']:+.2f} dB, "
                f"gated {row['gated_minus_best_classical_db']:+.2f} dB (gate chose {', '.join(decisions)}; gate {row['gate_seconds']:.0f} s)"
                + (f"; adaptation {row['adaptation_seconds']:.1f} s, left-out dB before -> after "
                   + ", ".join(f"{a} -> {b}" for a, b in adapt_scores) if adapt_seconds else ""), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
