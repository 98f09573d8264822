"""Finding broken slices: exactly the damaged ones, and nothing on clean scans."""

from __future__ import annotations

import numpy as np
import pytest

import medinpaint
from medinpaint.artifacts.labels import ArtifactKind

from conftest import blank_slices, shared

CLEAN = ["ct_abdomen_3mm.nii.gz", "ct_abdomen_dicom", "mr_brain_t1.nrrd"]


@pytest.mark.parametrize("name", CLEAN)
def test_clean_scan_flags_nothing(name):
    volume = medinpaint.load(shared(name))
    # ct_abdomen_3mm holds a real hip implant (tests/test_metal.py): here only slice problems count.
    found = medinpaint.find_artifacts(volume, artifacts="slices")
    assert found.bad_slices == {}
    assert not found.labels.any()
    if name != "ct_abdomen_3mm.nii.gz":  # nothing at all under auto, metal included
        assert not medinpaint.find_artifacts(volume).labels.any()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_five_blanked_slices_found_exactly(seed):
    volume = medinpaint.load(shared("ct_abdomen_3mm.nii.gz"))
    damaged, ks = blank_slices(volume.array, 5, seed)
    found = medinpaint.find_artifacts(volume.with_array(damaged), artifacts="slices")  # not its hip implant
    assert sorted(found.bad_slices) == ks
    assert set(found.bad_slices.values()) == {ArtifactKind.BLANK_SLICE}
    assert np.array_equal(np.nonzero(found.labels.any(axis=(0, 1)))[0], ks)


def test_nan_and_noise_slices_found():
    volume = medinpaint.load(shared("ct_abdomen_3mm.nii.gz"))
    array = volume.array.copy()
    array[:, :, 30] = np.nan
    array[:, :, 70] += np.random.default_rng(0).normal(0, 400, array.shape[:2]).astype(np.float32)
    found = medinpaint.find_artifacts(volume.with_array(array))
    assert found.bad_slices == {30: ArtifactKind.BLANK_SLICE, 70: ArtifactKind.CORRUPT_SLICE}


def test_mr_blank_slices_found():
    volume = medinpaint.load(shared("mr_brain_t1.nrrd"))
    damaged, ks = blank_slices(volume.array, 3, seed=5)
    assert sorted(medinpaint.find_artifacts(volume.with_array(damaged)).bad_slices) == ks


def test_gap_in_positions_is_a_missing_slice():
    volume = medinpaint.load(shared("io_edge_cases/failing_sliceincrement_002"))
    found = medinpaint.find_artifacts(volume)
    assert found.bad_slices == {3: ArtifactKind.MISSING_SLICE}
    assert (found.labels[:, :, 3] == ArtifactKind.MISSING_SLICE).all()
    assert not found.labels[:, :, [0, 1, 2, 4]].any()


def test_user_mask_replaces_detection(tmp_path):
    volume = medinpaint.load(shared("ct_abdomen_3mm.nii.gz"))
    damaged, _ = blank_slices(volume.array, 2, seed=3)
    mask = np.zeros(volume.shape, bool)
    mask[40:60, 40:60, 50:55] = True
    found = medinpaint.find_artifacts(volume.with_array(damaged), user_mask=mask)
    assert found.bad_slices == {}
    assert np.array_equal(found.labels == ArtifactKind.USER_MASK, mask)
