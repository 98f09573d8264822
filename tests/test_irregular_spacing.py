"""Irregular slice spacing onto a regular grid (the real GE head CT: 4 mm, 1.08 mm and 7 mm steps,
18.5 degree gantry tilt), --slice-spacing, and MONOCHROME1 pixels."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pydicom
import pytest

import medinpaint
from medinpaint.artifacts.find import ArtifactMask, find_artifacts
from medinpaint.artifacts.labels import ArtifactKind
from medinpaint.correct import correct
from medinpaint.data.volume import LPS_TO_RAS, Volume
from medinpaint.errors import MedinpaintError

from conftest import shared

GE = "ct_head_ge_variable_spacing"


@pytest.fixture(scope="module")
def ge() -> Volume:
    return medinpaint.load(shared(GE))


@pytest.fixture(scope="module")
def acquired():
    """Every file of the series, independently of the loader: (height along the normal, HU pixels [i, j], name)."""
    out = []
    for path in sorted(shared(GE).iterdir()):
        ds = pydicom.dcmread(path)
        iop = np.array(ds.ImageOrientationPatient, float)
        normal = np.cross(iop[:3], iop[3:])
        hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        out.append((float(np.dot(np.array(ds.ImagePositionPatient, float), normal)), hu.T, path.name, normal))
    return sorted(out, key=lambda a: a[0])


def _grid_heights(volume: Volume, normal: np.ndarray) -> np.ndarray:
    lps = LPS_TO_RAS @ volume.affine
    return np.array([float(np.dot(lps[:3, 3] + k * lps[:3, 2], normal)) for k in range(volume.shape[2])])


def test_ge_series_loads_onto_the_most_common_step(ge, acquired):
    heights = np.array([a[0] for a in acquired])
    steps = np.diff(heights)
    assert np.isclose(steps, 4.0019, atol=1e-3).sum() == 13 and np.isclose(steps, 6.9986, atol=1e-3).sum() == 13
    normal = acquired[0][3]
    grid = _grid_heights(ge, normal)
    step = float(np.mean(np.diff(grid)))
    assert step == pytest.approx(steps[:13].mean(), abs=1e-4)  # 13 x 4 mm ties 13 x 7 mm: the smaller wins
    assert grid[0] == pytest.approx(heights[0], abs=1e-4) and grid[-1] <= heights[-1] + 0.2
    assert ge.is_oblique_stack  # the tilt is kept: k runs along the line of slice origins
    tol = max(0.1, 0.05 * step)
    placed = [k for k, f in enumerate(ge.source.slice_files) if f is not None]
    assert len(placed) == 18 and ge.shape == (512, 512, 37)
    by_name = {a[2]: a for a in acquired}
    for k in placed:
        h, hu, _, _ = by_name[ge.source.slice_files[k].name]
        assert abs(h - grid[k]) <= tol
        np.testing.assert_array_equal(ge.array[:, :, k], hu.astype(np.float32))  # bit-exact where placed
    assert set(placed) | set(ge.placeholder_slices) | set(ge.resampled_slices) == set(range(37))
    assert len(ge.placeholder_slices) == 9 and len(ge.resampled_slices) == 10
    assert not set(ge.placeholder_slices) & set(ge.resampled_slices)
    for k in ge.placeholder_slices:
        assert np.isnan(ge.array[:, :, k]).all()
        assert np.abs(heights - grid[k]).min() > tol
    for k in ge.resampled_slices:
        assert np.abs(heights - grid[k]).min() > tol
        above = int(np.searchsorted(heights, grid[k]))
        w = (grid[k] - heights[above - 1]) / (heights[above] - heights[above - 1])
        expected = (1 - w) * acquired[above - 1][1] + w * acquired[above][1]
        np.testing.assert_allclose(ge.array[:, :, k], expected, atol=1e-2)
    plan = ge.slice_grid
    assert plan["steps_found"] == "13 x 4 mm, 1 x 1.08 mm, 13 x 7 mm"
    assert (plan["on_grid"], plan["resampled"], plan["to_synthesize"], plan["unused_slices"]) == (18, 10, 9, [])
    assert ge.describe()["slice_grid"] == plan and ge.describe()["resampled_slices"] == list(ge.resampled_slices)


def test_regular_series_keeps_every_slice_on_the_grid():
    plan = medinpaint.load(shared("ct_abdomen_dicom")).slice_grid
    assert (plan["steps_found"], plan["on_grid"], plan["resampled"], plan["to_synthesize"]) == ("19 x 2 mm", 20, 0, 0)


def test_detection_flags_placeholders_missing_and_resampled_slices(ge):
    found = find_artifacts(ge)
    assert {k for k, v in found.bad_slices.items() if v == ArtifactKind.MISSING_SLICE} == set(ge.placeholder_slices)
    for k in ge.resampled_slices:
        assert (found.labels[:, :, k] == ArtifactKind.RESAMPLED_SLICE).all()
        assert k not in found.bad_slices
    assert found.resampled_slices == ge.resampled_slices
    resampled = found.labels == ArtifactKind.RESAMPLED_SLICE
    assert found.synthesized[resampled].all() and not found.to_fill[resampled].any()  # flagged, never refilled
    assert found.to_fill[:, :, list(ge.placeholder_slices)].all()
    again = ArtifactMask.from_labels(found.labels, found.affine, ["file"])
    assert again.resampled_slices == ge.resampled_slices and again.bad_slices == found.bad_slices
    # Whatever the user asks, what was not measured stays flagged.
    none = find_artifacts(ge, artifacts="none")
    assert (none.labels[:, :, list(ge.resampled_slices)] == ArtifactKind.RESAMPLED_SLICE).all()
    assert (none.labels[:, :, list(ge.placeholder_slices)] == ArtifactKind.MISSING_SLICE).all()


def test_correct_classical_flags_every_slice_not_acquired(cli, tmp_path, ge):
    out = tmp_path / "ge.nii.gz"
    code, _, err = cli("correct", shared(GE), out, "--method", "classical", "--quiet")
    assert code == 0, err
    values = np.asarray(nib.load(out).dataobj).astype(np.float64)
    mask = np.asarray(nib.load(tmp_path / "ge_desc-synthesized_mask.nii.gz").dataobj)
    placed = [k for k, f in enumerate(ge.source.slice_files) if f is not None]
    assert not mask[:, :, placed].any()
    np.testing.assert_array_equal(values[:, :, placed], ge.array[:, :, placed])
    assert (mask[:, :, list(ge.placeholder_slices)] == ArtifactKind.MISSING_SLICE).all()
    assert (mask[:, :, list(ge.resampled_slices)] == ArtifactKind.RESAMPLED_SLICE).all()
    np.testing.assert_allclose(values[:, :, list(ge.resampled_slices)], ge.array[:, :, list(ge.resampled_slices)], atol=0.5)
    filled = values[:, :, list(ge.placeholder_slices)]
    assert np.isfinite(filled).all() and filled.std() > 100  # anatomy, not a constant
    provenance = json.loads((tmp_path / "ge.json").read_text())
    assert provenance["Geometry"]["slice_grid"]["to_synthesize"] == 9
    by_kind = provenance["SynthesizedVoxels"]["by_kind"]
    assert by_kind["resampled_slice"]["count"] == 10 * 512 * 512
    assert by_kind["missing_slice"]["count"] == 9 * 512 * 512


def test_network_keeps_resampled_values_and_fills_placeholders(ge):
    i0, n = 224, 64  # a crop keeps the network quick on the CPU; every slice kind is in it
    affine = ge.affine.copy()
    affine[:3, 3] = ge.affine[:3, :3] @ [i0, i0, 0] + ge.affine[:3, 3]
    crop = Volume(np.ascontiguousarray(ge.array[i0:i0 + n, i0:i0 + n, :]), affine, modality="CT",
                  placeholder_slices=ge.placeholder_slices, resampled_slices=ge.resampled_slices)
    result = correct(crop, find_artifacts(crop), method="network", gate=False)
    out, original = result.volume.array, crop.array
    resampled, missing = list(ge.resampled_slices), list(ge.placeholder_slices)
    np.testing.assert_array_equal(out[:, :, resampled], original[:, :, resampled])
    assert np.isfinite(out[:, :, missing]).all()
    assert (result.synthesized[:, :, resampled] == ArtifactKind.RESAMPLED_SLICE).all()
    assert (result.synthesized[:, :, missing] == ArtifactKind.MISSING_SLICE).all()
    acquired = [k for k in range(crop.shape[2]) if k not in resampled + missing]
    np.testing.assert_array_equal(out[:, :, acquired], original[:, :, acquired])
    assert not result.synthesized[:, :, acquired].any()


def test_info_prints_steps_grid_and_plan(cli):
    code, out, err = cli("info", shared(GE))
    assert code == 0, err
    assert "13 x 4 mm, 1 x 1.08 mm, 13 x 7 mm" in out
    assert "4.002 mm (most common step; ties: the smaller): 18 acquired slices on it, 10 resampled, 9 to synthesize" in out
    assert "resampled_slice" in out and "missing_slice" in out


def test_slice_spacing_option_sets_the_grid_and_reports_unused_slices(cli, tmp_path):
    code, out, err = cli("info", shared(GE), "--slice-spacing", "8", "--json")
    assert code == 0, err
    report = json.loads(out)
    plan = report["slice_grid"]
    assert report["shape"][2] == 19 and plan["grid_step_mm"] == 8.0 and plan["grid_rule"] == "--slice-spacing"
    # 8 mm skips every other 4 mm slice: two acquired slices per cell, the unplaced one reported by name.
    assert [u["file"] for u in plan["unused_slices"]] == ["02.dcm", "04.dcm", "06.dcm", "08.dcm", "10.dcm", "12.dcm", "14.dcm"]
    mask = tmp_path / "m.nii.gz"
    code, _, err = cli("mask", shared(GE), mask, "--slice-spacing", "8", "--artifacts", "slices", "--quiet")
    assert code == 0, err
    labels = np.asarray(nib.load(mask).dataobj)
    assert labels.shape == (512, 512, 19)
    assert {int(k) for k in np.flatnonzero((labels == ArtifactKind.RESAMPLED_SLICE).all(axis=(0, 1)))} == set(
        json.loads((tmp_path / "m.json").read_text())["Artifacts"]["resampled_slices"])


@pytest.mark.parametrize("value, message", [("0", "positive"), ("-4", "positive"), ("nan", "positive"),
                                            ("0.05", "more than 2000")])
def test_nonsense_slice_spacing_is_one_line_exit_2(cli, tmp_path, value, message):
    out = tmp_path / "m.nii.gz"
    code, _, err = cli("mask", shared(GE), out, "--slice-spacing", value, "--quiet")
    assert code == 2 and err.startswith("error:") and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not any(tmp_path.iterdir())


def test_slice_spacing_on_a_regular_grid_file_is_refused(cli):
    code, _, err = cli("info", shared("ct_abdomen_3mm.nii.gz"), "--slice-spacing", "2")
    assert code == 2 and "applies to DICOM series" in err


def _copy_slices(src, dst, count, **changes):
    dst.mkdir()
    for path in sorted(src.iterdir())[:count]:
        ds = pydicom.dcmread(path)
        for keyword, value in changes.items():
            setattr(ds, keyword, value)
        ds.save_as(dst / path.name)
    return dst


def test_non_collinear_origins_are_still_refused(tmp_path):
    folder = _copy_slices(shared(GE), tmp_path / "bent", 4)
    path = folder / "03.dcm"
    ds = pydicom.dcmread(path)
    ds.ImagePositionPatient = [float(ds.ImagePositionPatient[0]) + 5.0] + [float(v) for v in ds.ImagePositionPatient[1:]]
    ds.save_as(path)
    with pytest.raises(MedinpaintError, match="do not lie on one line"):
        medinpaint.load(folder)


def test_monochrome1_is_inverted_like_highdicom(tmp_path):
    highdicom = pytest.importorskip("highdicom")
    folder = _copy_slices(shared(GE), tmp_path / "m1", 4, PhotometricInterpretation="MONOCHROME1", Modality="MR")
    volume = medinpaint.load(folder)
    assert volume.shape[2] == 4 and not volume.placeholder_slices and not volume.resampled_slices
    for k, path in enumerate(volume.source.slice_files):
        ds = pydicom.dcmread(path)
        expected = highdicom.Image.from_dataset(ds, copy=True).get_frame(1, apply_voi_transform=False, apply_presentation_lut=True)
        np.testing.assert_array_equal(volume.array[:, :, k], expected.T.astype(np.float32))
        stored = ds.pixel_array.T
        # Higher is brighter as in MONOCHROME2: the order of the stored values is reversed.
        assert volume.array[:, :, k][stored == stored.max()].max() == volume.array[:, :, k].min()


def test_monochrome1_ct_keeps_hounsfield_units(tmp_path, acquired):
    folder = _copy_slices(shared(GE), tmp_path / "m1ct", 4, PhotometricInterpretation="MONOCHROME1")
    volume = medinpaint.load(folder)
    for k in range(4):
        np.testing.assert_array_equal(volume.array[:, :, k], acquired[k][1].astype(np.float32))


def test_input_hash_covers_slices_that_are_not_placed_on_the_grid(tmp_path):
    """A file that is only interpolated from, or not used at all, is still part of the input's SHA-256."""
    from medinpaint.provenance import input_sha256

    folder = tmp_path / "ge"
    folder.mkdir()
    for path in shared(GE).iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    volume = medinpaint.load(folder, slice_spacing=8.0)
    unused = volume.slice_grid["unused_slices"]
    assert unused, "an 8 mm grid leaves some of the 4 mm slices unused"
    assert len(volume.source.input_files) == 28
    before = input_sha256(volume)
    target = folder / unused[0]["file"]
    ds = pydicom.dcmread(target)
    ds.PatientComments = "edited"
    ds.save_as(target)
    after = input_sha256(medinpaint.load(folder, slice_spacing=8.0))
    assert after != before


def test_acquired_run_is_the_longest_stretch_the_loader_did_not_make(ge):
    """Training and the quality benchmark take truth only from acquired slices: on the GE head that is the
    14 slices at the 4 mm step, at their own place in the patient."""
    made = set(ge.placeholder_slices) | set(ge.resampled_slices)
    run = ge.acquired_run()
    assert run.shape == (512, 512, 14) and not run.placeholder_slices and not run.resampled_slices
    matches = [k for k in range(ge.shape[2] - 13) if np.array_equal(ge.array[:, :, k : k + 14], run.array)]
    assert len(matches) == 1
    first = matches[0]
    assert not made & set(range(first, first + 14))
    assert {first - 1, first + 14} & set(range(ge.shape[2])) <= made  # a longer run would not be acquired
    np.testing.assert_allclose(run.affine[:3, 3], ge.affine[:3, 3] + first * ge.affine[:3, 2], atol=1e-6)


def test_a_scan_with_no_acquired_slice_has_no_acquired_run():
    volume = Volume(np.zeros((4, 4, 3), np.float32), np.eye(4), placeholder_slices=(0, 2), resampled_slices=(1,))
    with pytest.raises(MedinpaintError, match="no acquired slice"):
        volume.acquired_run()
