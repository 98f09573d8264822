"""Loading: DICOM ordering and HU, edge cases, and exact geometry through every writer."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

import medinpaint
from medinpaint.data.save import write_file
from medinpaint.data.volume import affine_from_itk
from medinpaint.errors import MedinpaintError

from conftest import enhanced_multiframe, shared


def _sitk_series(folder):
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def test_dicom_series_sorted_by_position_in_hu_like_simpleitk():
    folder = shared("ct_abdomen_dicom")
    volume = medinpaint.load(folder)
    reference = _sitk_series(folder)  # GDCM sorts along the slice normal too
    expected = np.transpose(sitk.GetArrayFromImage(reference), (2, 1, 0)).astype(np.float32)
    assert volume.shape == expected.shape == (512, 512, 20)
    np.testing.assert_array_equal(volume.array, expected)
    np.testing.assert_allclose(volume.affine, affine_from_itk(reference.GetSpacing(), reference.GetOrigin(), reference.GetDirection()), atol=1e-4)
    assert volume.modality == "CT"
    assert -1100 < volume.array.min() < -900  # air in HU: rescale intercept applied
    np.testing.assert_allclose(volume.spacing, [0.9765625, 0.9765625, 2.0], atol=1e-4)
    # Positions decrease with instance number here: the order comes from positions, not names.
    z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in volume.source.slice_files]
    assert z == sorted(z)


@pytest.mark.parametrize("name", ["ct_abdomen_3mm.nii.gz", "mr_brain_t1.nrrd", "ct_abdomen_dicom",
                                  "io_edge_cases/failing_gantrytilting_001"])
@pytest.mark.parametrize("fmt, ext", [("nifti", ".nii.gz"), ("nifti", ".nii"), ("nrrd", ".nrrd"), ("mha", ".mha")])
def test_geometry_round_trip(tmp_path, name, fmt, ext):
    volume = medinpaint.load(shared(name))
    out = tmp_path / f"copy{ext}"
    write_file(volume, out, fmt, volume.source.stored_dtype)
    again = medinpaint.load(out)
    assert again.shape == volume.shape
    np.testing.assert_allclose(again.spacing, volume.spacing, atol=1e-4)
    np.testing.assert_allclose(again.origin, volume.origin, atol=1e-4)
    np.testing.assert_allclose(again.affine, volume.affine, atol=1e-4)
    np.testing.assert_array_equal(again.array, volume.array)


def test_gantry_tilt_is_kept_oblique():
    volume = medinpaint.load(shared("io_edge_cases/failing_gantrytilting_001"))
    assert volume.is_oblique_stack
    files = sorted(shared("io_edge_cases/failing_gantrytilting_001").iterdir())
    first = pydicom.dcmread(volume.source.slice_files[0], stop_before_pixels=True)
    last = pydicom.dcmread(volume.source.slice_files[-1], stop_before_pixels=True)
    # The k column of the affine joins the first and last slice positions exactly (LPS -> RAS).
    step = (np.array(last.ImagePositionPatient, float) - np.array(first.ImagePositionPatient, float)) / (volume.shape[2] - 1)
    np.testing.assert_allclose(volume.affine[:3, 2], step * [-1, -1, 1], atol=1e-4)
    assert len(files) == volume.shape[2]


def test_missing_instance_becomes_flagged_placeholder():
    volume = medinpaint.load(shared("io_edge_cases/failing_sliceincrement_002"))
    assert volume.shape[2] == 5  # 4 files + 1 placeholder on the regular grid
    assert volume.placeholder_slices == (3,)
    k = volume.placeholder_slices[0]
    assert np.isnan(volume.array[:, :, k]).all()
    assert volume.source.slice_files[k] is None
    acquired = [i for i in range(5) if i != k]
    assert np.isfinite(volume.array[:, :, acquired]).all()


def test_enhanced_multiframe_matches_the_classic_series(tmp_path):
    pytest.importorskip("highdicom")
    folder = shared("ct_abdomen_dicom")
    path = enhanced_multiframe(sorted(folder.iterdir()), tmp_path / "enhanced.dcm")
    multi = medinpaint.load(path)
    classic = medinpaint.load(folder)
    assert multi.shape == classic.shape
    np.testing.assert_allclose(multi.affine, classic.affine, atol=1e-4)
    np.testing.assert_array_equal(multi.array, classic.array)


def test_two_series_folder_needs_series_choice(tmp_path):
    both = tmp_path / "both"
    both.mkdir()
    for src in ("io_edge_cases/failing_gantrytilting_001", "io_edge_cases/failing_slicecount_001"):
        for f in shared(src).iterdir():
            (both / f"{src.split('/')[-1]}_{f.name}").write_bytes(f.read_bytes())
    with pytest.raises(MedinpaintError, match="series; choose one with --series"):
        medinpaint.load(both)
    uid = str(pydicom.dcmread(next(shared("io_edge_cases/failing_slicecount_001").iterdir())).SeriesInstanceUID)
    chosen = medinpaint.load(both, series=uid)
    assert chosen.shape[2] == 2 and chosen.source.series_uid == uid


def test_one_position_series_is_refused():
    with pytest.raises(MedinpaintError, match="position"):
        medinpaint.load(shared("io_edge_cases/failing_notavolume_001"))
