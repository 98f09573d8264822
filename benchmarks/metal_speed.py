"""Cost of the metal correction on 512 x 512 slices, 2 CPU cores by default.

Metal is inserted into the real `ct_abdomen_dicom` series (512 x 512 x 20, 0.98 mm) by our own
simulator (the speed does not depend on who made the artifact), then `find_artifacts(...,
artifacts="metal")` is timed: detection, the metal halo, the change NMAR makes (re-projection of
the trace, back-projection over the patient) and the per-slice gate.  Printed: seconds per slice
holding metal, how many of those slices the gate corrected, the streak voxels, and peak memory
above the start.

    python benchmarks/metal_speed.py [--kinds rod,screw,ball,irregular] [--threads 2] [--cache DIR] [--config SETTINGS.yaml]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import medinpaint
from medinpaint.artifacts.find import find_artifacts
from medinpaint.artifacts.labels import ArtifactKind
from medinpaint.config import load_settings
from medinpaint.simulate import simulate_metal_volume
from speed import peak_mb, reset_peak, rss_mb  # benchmarks/speed.py

REPO = Path(__file__).resolve().parent.parent


def case(clean, kind: str, seed: int, cache: Path | None):
    cached = cache / f"speed-{kind}-{seed}.npz" if cache else None
    if cached and cached.exists():
        with np.load(cached) as saved:
            return clean.with_array(saved["damaged"])
    damaged, _, _ = simulate_metal_volume(clean, seed=seed, kind=kind)
    if cached:
        cached.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(cached, damaged=damaged.array)
    return damaged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--kinds", default="rod,screw,ball,irregular")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, help="keep the simulated scans here (reused when present)")
    parser.add_argument("--config", type=Path, help="settings YAML (as `correct --config`), e.g. to time metal.trust_window_mm: null")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clean = medinpaint.load(args.data / "ct_abdomen_dicom")
    settings = load_settings(args.config).metal
    rows = []
    for seed, kind in enumerate(args.kinds.split(",")):
        damaged = case(clean, kind, seed, args.cache)
        reset_peak()
        start_mb = rss_mb()
        started = time.perf_counter()
        found = find_artifacts(damaged, artifacts="metal", metal_settings=settings)
        seconds = time.perf_counter() - started
        n = len(found.metal_gate)
        rows.append({
            "kind": kind, "slices_with_metal": n, "seconds": round(seconds, 1),
            "seconds_per_slice": round(seconds / max(n, 1), 2),
            "corrected_slices": sum(g["decision"].startswith("corrected") for g in found.metal_gate.values()),
            "streak_voxels": int((found.labels == ArtifactKind.METAL_STREAK).sum()),
            "peak_mb_above_start": round(peak_mb() - start_mb, 1),
        })
        print(json.dumps(rows[-1]), flush=True)
    total = sum(r["seconds"] for r in rows) / max(sum(r["slices_with_metal"] for r in rows), 1)
    print(json.dumps({"threads": args.threads, "seconds_per_metal_slice": round(total, 2)}))


if __name__ == "__main__":
    main()
