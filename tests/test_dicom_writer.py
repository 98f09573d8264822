"""The derived DICOM series: placeholders get their own position, multi-frame sources their frame."""

from __future__ import annotations

import shutil

import numpy as np
import pydicom
import pytest

import medinpaint
from medinpaint.data.dicom_writer import write_dicom_series, write_seg
from medinpaint.data.volume import LPS_TO_RAS

from conftest import enhanced_multiframe, shared

FIRST, COUNT, REMOVED = 6, 5, 2  # 5 neighbouring files of ct_abdomen_dicom; the middle one (k = 2 too) removed


def _ct_files():
    return sorted(shared("ct_abdomen_dicom").iterdir())


def _filled(volume):
    """The volume with its placeholders filled by the mean of their neighbours (as a fill would)."""
    array = volume.array.copy()
    for k in volume.placeholder_slices:
        array[:, :, k] = (array[:, :, k - 1] + array[:, :, k + 1]) / 2
    return volume.with_array(array)


def _write(volume, folder):
    folder.mkdir()
    mask = np.zeros(volume.shape, np.uint8)
    mask[:, :, list(volume.placeholder_slices)] = 1
    images = write_dicom_series(volume, folder, mask, "test")
    write_seg(images, mask, folder / "seg.dcm")  # highdicom validates the references on construction
    return [pydicom.dcmread(folder / f"IM{k + 1:05d}.dcm") for k in range(volume.shape[2])]


def _numbers(value) -> np.ndarray:
    return np.array([float(v) for v in value])


def test_placeholder_slice_gets_the_position_of_the_slice_it_replaces(tmp_path):
    files = _ct_files()[FIRST:FIRST + COUNT]
    removed = pydicom.dcmread(files[REMOVED], stop_before_pixels=True)  # the truth for the placeholder
    series = tmp_path / "series"
    series.mkdir()
    for i, path in enumerate(files):
        if i != REMOVED:
            shutil.copy(path, series / path.name)
    volume = medinpaint.load(series)
    assert volume.shape[2] == COUNT and volume.placeholder_slices == (REMOVED,)

    out = _write(_filled(volume), tmp_path / "out")
    placeholder, neighbour = out[REMOVED], out[REMOVED - 1]
    lps = LPS_TO_RAS @ volume.affine
    np.testing.assert_allclose(_numbers(placeholder.ImagePositionPatient), lps[:3, 3] + REMOVED * lps[:3, 2], atol=1e-4)
    # Not the neighbour's copies: the removed file's own values, which this scanner steps with z.
    np.testing.assert_allclose(_numbers(placeholder.ImagePositionPatient), _numbers(removed.ImagePositionPatient), atol=1e-4)
    assert float(placeholder.SliceLocation) == pytest.approx(float(removed.SliceLocation), abs=1e-4)
    assert float(placeholder.SliceLocation) != pytest.approx(float(neighbour.SliceLocation), abs=0.5)
    for keyword in ("DataCollectionCenterPatient", "ReconstructionTargetCenterPatient"):
        np.testing.assert_allclose(_numbers(placeholder[keyword].value), _numbers(removed[keyword].value), atol=1e-4)
    assert "AcquisitionTime" not in placeholder and "AcquisitionDateTime" not in placeholder
    assert "absent" in placeholder.ImageComments and "SourceImageSequence" not in placeholder

    # Acquired slices keep their own values exactly, and every decimal string is valid (<= 16 characters).
    for k, ds in enumerate(out):
        if k == REMOVED:
            continue
        original = pydicom.dcmread(volume.source.slice_files[k], stop_before_pixels=True)
        assert str(ds.SliceLocation) == str(original.SliceLocation)
        assert ds.AcquisitionTime == original.AcquisitionTime
        np.testing.assert_allclose(_numbers(ds.ImagePositionPatient), _numbers(original.ImagePositionPatient), atol=1e-4)
    raw = [(out_ds, kw) for out_ds in out for kw in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceLocation")]
    for ds, keyword in raw:
        values = ds[keyword].value if ds[keyword].VM > 1 else [ds[keyword].value]
        assert all(len(v.original_string if hasattr(v, "original_string") else str(v)) <= 16 for v in values), keyword


def test_slices_without_a_file_in_a_tilted_stack_step_like_the_source(tmp_path):
    """GE steps SliceLocation along the table (4.22 mm a slice here), not the normal (4.0 mm)."""
    volume = medinpaint.load(shared("ct_head_ge_variable_spacing"))  # tilted, with placeholders and resampled slices
    files = volume.source.slice_files
    without = [k for k, f in enumerate(files) if f is None]
    assert set(volume.placeholder_slices) <= set(without) and len(without) >= 10
    array = volume.array.copy()
    array[np.isnan(array)] = 0
    out = _write(volume.with_array(array), tmp_path / "out")

    lps = LPS_TO_RAS @ volume.affine
    acquired = [k for k, f in enumerate(files) if f is not None]
    original = [float(pydicom.dcmread(files[k], stop_before_pixels=True).SliceLocation) for k in acquired]
    written = np.array([float(ds.SliceLocation) for ds in out])
    expected = np.interp(np.arange(len(out)), acquired, original)  # the source's own locations, linear in k
    np.testing.assert_allclose(written[without], expected[without], atol=0.1)
    assert np.all(np.diff(written) > 0)
    for k, ds in enumerate(out):
        np.testing.assert_allclose(_numbers(ds.ImagePositionPatient), lps[:3, 3] + k * lps[:3, 2], atol=1e-4)


def test_references_into_a_multiframe_source_name_the_frame(tmp_path):
    path = enhanced_multiframe(_ct_files()[:4], tmp_path / "enhanced.dcm")
    enhanced = pydicom.dcmread(path, stop_before_pixels=True)
    volume = medinpaint.load(path)
    out = _write(volume, tmp_path / "out")

    # Frame n (1-based) of the source and the derived slice that references it lie at one position.
    frame_positions = [_numbers(item.PlanePositionSequence[0].ImagePositionPatient) for item in enhanced.PerFrameFunctionalGroupsSequence]
    numbers = []
    for ds in out:
        (ref,) = ds.SourceImageSequence
        assert ref.ReferencedSOPInstanceUID == enhanced.SOPInstanceUID
        assert ref.ReferencedSOPClassUID == enhanced.SOPClassUID
        number = int(ref.ReferencedFrameNumber)
        np.testing.assert_allclose(frame_positions[number - 1], _numbers(ds.ImagePositionPatient), atol=1e-4)
        numbers.append(number)
    assert sorted(numbers) == [1, 2, 3, 4]
    assert numbers != sorted(numbers)  # highdicom keeps the classic files' order, which runs against k here
