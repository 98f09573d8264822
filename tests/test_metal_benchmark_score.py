"""The metal benchmark's streaks score (benchmarks/metal.py) must judge the scored voxels only."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from scipy import ndimage

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "metal.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("metal_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kept_metal_does_not_leak_into_the_streaks_score():
    """Two corrections that differ only inside the excluded metal score the same; a 40 HU error beside
    the metal counts in full (with the metal low-passed into them, 8000 HU of metal swamped it)."""
    bench = load_benchmark()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:96, :96]
    reference = np.where(np.hypot(yy - 48, xx - 48) < 40, 40.0, -1000.0)[:, :, None] + rng.normal(0, 5, (96, 96, 1))
    metal = (np.hypot(yy - 48, xx - 48) < 4)[:, :, None]
    region = (np.hypot(yy - 48, xx - 48) < 38)[:, :, None] & ~ndimage.binary_dilation(metal, np.ones((3, 3, 1), bool))
    near = region & (np.hypot(yy - 48, xx - 48) < 9)[:, :, None]  # the scored ring beside the metal
    kept = np.where(metal, 8000.0, reference) + np.where(near, 40.0, 0.0)  # a method that leaves +40 HU beside the metal
    other = np.where(metal, 3000.0, kept)  # the same voxels in the region, another value in the metal
    a, b = bench.score(reference, kept, region)["streaks"], bench.score(reference, other, region)["streaks"]
    assert a == b
    error = bench.streak_view(reference, kept, region) - bench.low_pass(reference)
    assert 20.0 < np.median(error[near]) <= 40.0  # the ring's own error (blurred at its edges), not the metal's
    leaked = bench.low_pass(kept) - bench.low_pass(reference)
    assert np.abs(leaked[near]).max() > 1000.0  # what the old score (image low-passed as it was) mixed in
