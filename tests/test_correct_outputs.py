"""Correction end to end: only masked voxels change, and the mask and sidecar account for every change."""

from __future__ import annotations

import json

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

import medinpaint
from medinpaint.data.save import write_file
from medinpaint.data.volume import affine_from_itk
from medinpaint.artifacts.labels import ArtifactKind
from medinpaint.inpaint.models import DEFAULT_MODEL

from conftest import blank_slices, files_under, shared


@pytest.fixture(scope="module")
def damaged_ct(tmp_path_factory):
    """The real 3 mm CT with 5 slices blanked, as a NIfTI file (int32, like the original)."""
    volume = medinpaint.load(shared("ct_abdomen_3mm.nii.gz"))
    damaged, ks = blank_slices(volume.array, 5, seed=11)
    path = tmp_path_factory.mktemp("input") / "damaged.nii.gz"
    write_file(volume.with_array(damaged), path, "nifti", "int32")
    return path, ks, volume


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd", ".mha"])
def test_classical_file_outputs_account_for_every_change(cli, tmp_path, damaged_ct, ext):
    path, ks, clean = damaged_ct
    out = tmp_path / f"fixed{ext}"
    before = path.read_bytes()
    # Slices only: this CT's real hip implant (tests/test_metal.py) would add streak labels.
    code, _, err = cli("--quiet", "correct", path, out, "--method", "classical", "--artifacts", "slices")
    assert code == 0, err
    assert path.read_bytes() == before  # input untouched
    stem = "fixed"
    assert files_under(tmp_path) == sorted([f"{stem}{ext}", f"{stem}_desc-synthesized_mask{ext}", f"{stem}.json"])

    original = medinpaint.load(path)
    fixed = medinpaint.load(out)
    mask = medinpaint.load(tmp_path / f"{stem}_desc-synthesized_mask{ext}").array.astype(np.uint8)
    assert fixed.same_grid(original, atol_mm=1e-4)
    changed = fixed.array != original.array
    assert not (changed & (mask == 0)).any(), "a voxel outside the mask changed"
    assert np.array_equal(np.nonzero(mask.any(axis=(0, 1)))[0], ks)
    assert changed[mask > 0].mean() > 0.9  # the blank slices really were filled
    # Interpolated slices are close to the truth (HU), far closer than the blank value.
    error = np.abs(fixed.array[:, :, ks] - clean.array[:, :, ks]).mean()
    assert error < 60, error

    sidecar = json.loads((tmp_path / f"{stem}.json").read_text())
    assert sidecar["SynthesizedVoxels"]["count"] == int((mask > 0).sum())
    assert sidecar["SynthesizedVoxels"]["by_kind"]["blank_slice"]["count"] == int((mask == 2).sum())
    assert sidecar["SynthesizedMask"] == [f"{stem}_desc-synthesized_mask{ext}"]
    assert sidecar["GeneratedBy"][0]["Name"] == "medinpaint" and sidecar["Method"] == "classical"
    import hashlib

    assert sidecar["Sources"][0]["SHA256"] == hashlib.sha256(before).hexdigest()
    if ext == ".nii.gz":
        header = nib.load(out).header
        assert b"synthesized" in header["descrip"].tobytes()
        assert nib.load(out).get_data_dtype() == np.int32  # original dtype kept


def test_network_fill_beats_nothing_and_keeps_acquired_voxels(cli, tmp_path, damaged_ct):
    path, ks, clean = damaged_ct
    out = tmp_path / "fixed.nii.gz"
    code, _, err = cli("--quiet", "correct", path, out, "--uncertainty", "--gate", "off")  # the network's own fill (the gate: test_slice_gate.py)
    assert code == 0, err
    original, fixed = medinpaint.load(path), medinpaint.load(out)
    mask = medinpaint.load(tmp_path / "fixed_desc-synthesized_mask.nii.gz").array > 0
    assert not ((fixed.array != original.array) & ~mask).any()
    error = np.abs(fixed.array[:, :, ks] - clean.array[:, :, ks]).mean()
    assert error < 60, error
    sidecar = json.loads((tmp_path / "fixed.json").read_text())
    assert sidecar["Method"] == "network"
    assert sidecar["Model"]["Name"] == DEFAULT_MODEL and len(sidecar["Model"]["SHA256"]) == 64
    assert sidecar["Parameters"]["blend_mode"] == "gaussian"
    # This CT's real hip implant: its streaks were corrected (change-only NMAR, the default: the metal
    # model refines only when asked), its metal kept; the provenance names every model that ran.
    labels = medinpaint.load(tmp_path / "fixed_desc-synthesized_mask.nii.gz").array
    assert (labels == ArtifactKind.METAL_STREAK).any() and not (labels == ArtifactKind.METAL).any()
    assert "refined_by" not in sidecar["Parameters"]["metal"] and "metal" not in sidecar["Models"]
    assert sidecar["Models"]["slices"]["Name"] == DEFAULT_MODEL
    spread = medinpaint.load(tmp_path / "fixed_desc-uncertainty.nii.gz").array
    assert sidecar["Uncertainty"]["File"] == "fixed_desc-uncertainty.nii.gz"
    assert (spread[~mask] == 0).all() and spread[mask].max() > 0


def test_missing_instance_filled_into_a_dicom_series(cli, tmp_path):
    src = shared("io_edge_cases/failing_sliceincrement_002")
    out = tmp_path / "fixed"
    code, _, err = cli("--quiet", "correct", src, out, "--method", "classical")
    assert code == 0, err
    original = medinpaint.load(src)
    names = files_under(out)
    assert names == sorted([f"IM{k:05d}.dcm" for k in range(1, 6)] + ["provenance.json", "synthesized_mask.nii.gz", "synthesized_mask_seg.dcm"])

    # Read back by pydicom: a derived series that points at its sources.
    slices = [pydicom.dcmread(out / f"IM{k:05d}.dcm") for k in range(1, 6)]
    first_src = pydicom.dcmread(original.source.slice_files[0])
    assert {s.SeriesInstanceUID for s in slices} != {first_src.SeriesInstanceUID}
    assert len({s.SeriesInstanceUID for s in slices}) == 1
    assert all(s.StudyInstanceUID == first_src.StudyInstanceUID and s.PatientID == first_src.PatientID for s in slices)
    assert all(list(s.ImageType[:2]) == ["DERIVED", "SECONDARY"] and s.DerivationDescription for s in slices)
    assert "medinpaint" in slices[0].SeriesDescription
    assert slices[0].SourceImageSequence[0].ReferencedSOPInstanceUID == first_src.SOPInstanceUID
    assert "SourceImageSequence" not in slices[3] and "absent" in slices[3].ImageComments

    # Read back by SimpleITK and by medinpaint: the original geometry, the acquired voxels unchanged.
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(out), slices[0].SeriesInstanceUID))  # the SEG is its own series
    image = reader.Execute()
    assert image.GetSize() == original.shape
    again = medinpaint.load(out)
    np.testing.assert_allclose(again.affine, original.affine, atol=1e-4)
    np.testing.assert_allclose(affine_from_itk(image.GetSpacing(), image.GetOrigin(), image.GetDirection())[:3, 3], original.affine[:3, 3], atol=1e-4)
    acquired = [0, 1, 2, 4]
    np.testing.assert_array_equal(again.array[:, :, acquired], original.array[:, :, acquired])
    assert np.isfinite(again.array[:, :, 3]).all()

    # The SEG references the derived series and marks exactly the filled slice.
    seg = hd.seg.segread(out / "synthesized_mask_seg.dcm")
    assert seg.get_segment_description(1).segment_label == "synthesized: missing_slice"
    referenced = {r.ReferencedSOPInstanceUID for r in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {s.SOPInstanceUID for s in slices}
    labels = seg.get_volume(combine_segments=True).array if hasattr(seg, "get_volume") else None
    if labels is not None:
        assert labels.sum() == 512 * 512
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["SynthesizedVoxels"]["by_kind"] == {"missing_slice": {"count": 512 * 512, "fraction": 0.2}}
    assert provenance["SynthesizedMask"] == ["synthesized_mask.nii.gz", "synthesized_mask_seg.dcm"]


def test_dicom_to_dicom_keeps_hu_exactly_outside_the_mask(cli, tmp_path):
    src = shared("ct_abdomen_dicom")
    volume = medinpaint.load(src)
    mask = np.zeros(volume.shape, np.uint8)
    mask[200:260, 220:300, 8:12] = 1
    mask_path = tmp_path / "mask.nii.gz"
    write_file(volume.with_array(mask), mask_path, "nifti", "uint8")
    out = tmp_path / "out"
    code, _, err = cli("--quiet", "correct", src, out, "--mask", mask_path, "--method", "classical")
    assert code == 0, err
    again = medinpaint.load(out)
    np.testing.assert_allclose(again.affine, volume.affine, atol=1e-4)
    np.testing.assert_array_equal(again.array[mask == 0], volume.array[mask == 0])
    assert (again.array[mask > 0] != volume.array[mask > 0]).any()
    saved_mask = medinpaint.load(out / "synthesized_mask.nii.gz").array
    assert np.array_equal(saved_mask > 0, mask > 0)


def test_mask_command_writes_labels_and_summary(cli, tmp_path, damaged_ct):
    path, ks, _ = damaged_ct
    code, _, err = cli("--quiet", "mask", path, tmp_path / "labels.nrrd", "--artifacts", "slices")
    assert code == 0, err
    labels = medinpaint.load(tmp_path / "labels.nrrd").array
    assert np.array_equal(np.nonzero(labels.any(axis=(0, 1)))[0], ks)
    summary = json.loads((tmp_path / "labels.json").read_text())
    assert sorted(int(k) for k in summary["Artifacts"]["bad_slices"]) == ks


def test_existing_output_needs_overwrite(cli, tmp_path, damaged_ct):
    path, _, _ = damaged_ct
    out = tmp_path / "fixed.nii.gz"
    assert cli("--quiet", "correct", path, out, "--method", "classical")[0] == 0
    stamp = out.stat().st_mtime_ns
    code, _, err = cli("--quiet", "correct", path, out, "--method", "classical")
    assert code == 2 and "already exists" in err and out.stat().st_mtime_ns == stamp
    assert cli("--quiet", "correct", path, out, "--method", "classical", "--overwrite")[0] == 0
