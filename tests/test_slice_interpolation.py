"""Classical slice fills on real scans: which interpolation ``auto`` picks, and registered interpolation."""

from __future__ import annotations

import numpy as np
import pytest

import medinpaint
from medinpaint.inpaint.classical import choose_slice_order, interpolate_slices
from medinpaint.inpaint.registered import registered_slices
from medinpaint.metrics import masked_metrics

from conftest import shared


@pytest.mark.parametrize("name, expected", [("ct_abdomen_dicom", "cubic"), ("mr_brain_t1.nrrd", "linear")])
@pytest.mark.parametrize("every", [2, 4, 6])
def test_auto_picks_the_better_interpolation_even_when_slices_are_missing_throughout(name, expected, every):
    # Every 2nd / 4th / 6th slice missing leaves no five acquired slices in a row; auto used to
    # fall back to linear there, even on the 2 mm CT where cubic is 3 dB better.
    volume = medinpaint.load(shared(name))
    array = volume.array
    bad = list(range(1, array.shape[2] - 1, every))
    valid = [k for k in range(array.shape[2]) if k not in bad]
    assert choose_slice_order(array, valid) == expected
    mask = np.zeros(array.shape, bool)
    mask[:, :, bad] = True
    scores = {o: masked_metrics(array, interpolate_slices(array, bad, o), mask, volume.modality)["psnr_db"]
              for o in ("linear", "cubic")}
    assert max(scores, key=scores.get) == expected  # and that choice is the better one on the missing slices


def test_registered_interpolation_follows_a_moving_edge():
    rows, cols = np.mgrid[:64, :64]
    planes = [((rows - (20 + 2 * k)) ** 2 + (cols - 32) ** 2 < 100).astype(np.float32) * 100 for k in range(5)]
    array = np.stack(planes, axis=2)  # a disk of radius 10 moving 2 pixels a slice
    filled = registered_slices(array, [1, 2, 3])
    assert sorted(filled) == [1, 2, 3]
    linear = interpolate_slices(array, [1, 2, 3], "linear")
    for k in (1, 2, 3):
        err_registered = np.abs(filled[k] - array[:, :, k]).mean()
        err_linear = np.abs(linear[:, :, k] - array[:, :, k]).mean()
        assert err_registered < 0.2 * err_linear  # one disk in the right place, not two faint ones
    edge = registered_slices(array, [0, 1])  # one side only: a copy of the nearest, as interpolation does
    np.testing.assert_array_equal(edge[0], array[:, :, 2])


def test_registered_interpolation_beats_linear_across_runs_of_thick_mr_slices():
    volume = medinpaint.load(shared("mr_brain_t1.nrrd"))  # 6.5 mm slices: a run of 3 spans 26 mm
    for run in ([11, 12, 13], [15, 16, 17]):
        filled = volume.array.astype(np.float32).copy()
        for k, plane in registered_slices(volume.array, run).items():
            filled[:, :, k] = plane
        mask = np.zeros(volume.shape, bool)
        mask[:, :, run] = True
        linear = interpolate_slices(volume.array, run, "linear")
        gain = (masked_metrics(volume.array, filled, mask, "MR")["psnr_db"]
                - masked_metrics(volume.array, linear, mask, "MR")["psnr_db"])
        assert gain > 0.15, (run, gain)
