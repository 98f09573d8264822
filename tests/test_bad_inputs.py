"""The bad-input corpus: each case exits 2 with one ``error:`` line, writes nothing and leaves its input untouched.

Every case is built small in tmp_path (or read from the shared scans) and run through the CLI;
a few also run as a real process to prove the exit status and that stderr holds no traceback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from conftest import REPO, files_under, shared
from medinpaint.cli.main import build_parser
from medinpaint.hashing import sha256_file
from medinpaint.inpaint.models import MODELS_DIR


def _ct(shape=(32, 32, 12), blank: int | None = 6) -> np.ndarray:
    """A small CT-like volume (air, a round body with noise), one slice blanked so there is work to do."""
    rng = np.random.default_rng(0)
    i, j = np.mgrid[: shape[0], : shape[1]]
    inside = (i - shape[0] / 2) ** 2 + (j - shape[1] / 2) ** 2 < (shape[0] / 3) ** 2
    array = np.where(inside[..., None], 40.0, -1000.0) + rng.normal(0, 20, shape)
    if blank is not None:
        array[:, :, blank] = -1000.0
    return array.astype(np.float32)


def _nifti(path: Path, array, affine=None) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine), str(path))
    return path


def _dicom_file(path: Path, **elements) -> Path:
    """A minimal single-frame DICOM file with the given elements."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = elements.get("SOPClassUID", SecondaryCaptureImageStorage)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.Modality = "BADINPUT", "OT"
    for key, value in elements.items():
        setattr(ds, key, value)
    ds.save_as(str(path))  # preamble and file meta are set: a valid Part 10 file
    return path


def _screenshot(path: Path) -> Path:
    """Secondary Capture of an RGB screenshot: no position, no orientation, three samples per pixel."""
    pixels = np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    return _dicom_file(
        path, SOPClassUID=SecondaryCaptureImageStorage, ConversionType="WSD", Rows=48, Columns=64,
        SamplesPerPixel=3, PhotometricInterpretation="RGB", PlanarConfiguration=0, BitsAllocated=8, BitsStored=8,
        HighBit=7, PixelRepresentation=0, PixelData=pixels.tobytes(),
    )


BAD_CONFIGS = {  # name: (YAML text, a word of the error)
    "config with a YAML syntax error": ("inference: [roi_size: 1\n  overlap: {\n", "invalid yaml"),
    "config with an unknown key": ("inference:\n  overlapp: 0.5\n", "overlapp"),
    "config with a wrong type": ("slices:\n  corrupt_ratio: lots\n", "corrupt_ratio"),
    "config with 1e-3 (text to YAML)": ("slices:\n  blank_relative_std: 1e-3\n", "write 1.0e-3"),
}


def _case(name: str, tmp: Path) -> tuple[list, str]:
    """(CLI arguments, a word the error line must contain) for one bad input; inputs go in tmp/in."""
    inp, out = tmp / "in", tmp / "out"
    fixed = out / "fixed.nii.gz"
    good = _nifti(inp / "good.nii.gz", _ct())
    correct = ["correct", good, fixed, "--method", "classical"]
    if name == "truncated nifti":
        data = _nifti(inp / "whole.nii.gz", _ct()).read_bytes()
        (inp / "whole.nii.gz").write_bytes(data[: len(data) // 2])
        return ["correct", inp / "whole.nii.gz", fixed], "cannot read nifti"
    if name == "empty .nii":
        (inp / "empty.nii").write_bytes(b"")
        return ["correct", inp / "empty.nii", fixed], "cannot read nifti"
    if name == "zero-byte .nii.gz":
        (inp / "empty.nii.gz").write_bytes(b"")
        return ["correct", inp / "empty.nii.gz", fixed], "cannot read nifti"
    if name == "not-gzip .nii.gz":
        (inp / "plain.nii.gz").write_bytes(b"this is not gzip data\n" * 40)
        return ["correct", inp / "plain.nii.gz", fixed], "cannot read nifti"
    if name == "2D nifti":
        return ["correct", _nifti(inp / "flat.nii.gz", _ct()[:, :, 0]), fixed], "2D"
    if name == "4D nifti":
        return ["correct", _nifti(inp / "four.nii.gz", np.stack([_ct()] * 3, axis=-1)), fixed], "4D"
    if name == "RGB nifti":
        rgb = np.zeros((16, 16, 8), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
        return ["correct", _nifti(inp / "rgb.nii.gz", rgb), fixed], "RGB"
    if name == "NaN-only volume":
        return ["correct", _nifti(inp / "nan.nii.gz", np.full((16, 16, 8), np.nan, np.float32)), fixed], "NaN"
    if name == "all-constant volume":  # every slice blank: nothing acquired to repair from
        return ["correct", _nifti(inp / "flat.nii.gz", np.full((16, 16, 8), 7.0, np.float32)), fixed, "--method", "classical"], "every voxel"
    if name == "one-position DICOM series":
        return ["correct", shared("io_edge_cases/failing_notavolume_001"), fixed], "position"
    if name == "two series without --series":
        folder = inp / "two"
        folder.mkdir()
        for src in ("failing_gantrytilting_001", "failing_slicecount_001"):
            for f in shared(f"io_edge_cases/{src}").iterdir():
                shutil.copy(f, folder / f"{src}_{f.name}")
        return ["correct", folder, fixed], "--series"
    if name == "unknown --series UID":
        return ["correct", shared("io_edge_cases/failing_gantrytilting_001"), fixed, "--series", "1.2.3.4.5"], "no series 1.2.3.4.5"
    if name == "secondary-capture screenshot file":
        return ["correct", _screenshot(inp / "screenshot.dcm"), fixed], "2D image"
    if name == "folder of a secondary-capture screenshot":
        (inp / "shots").mkdir()
        return ["correct", _screenshot(inp / "shots" / "screenshot.dcm").parent, fixed], "ImagePositionPatient"
    if name == "DICOM without pixel data":
        folder = inp / "nopixels"
        folder.mkdir()
        for f in sorted(shared("ct_abdomen_dicom").iterdir())[:4]:  # a real series, its pixels stripped
            ds = pydicom.dcmread(f)
            del ds.PixelData
            ds.save_as(folder / f"{f.name[-5:]}.dcm")
        return ["correct", folder, fixed], "pixel data"
    if name == "folder without images":
        (inp / "notes").mkdir()
        (inp / "notes" / "readme.txt").write_text("no images here\n")
        return ["correct", inp / "notes", fixed], "no dicom"
    if name == "non-existent input":
        return ["correct", inp / "nope.nii.gz", fixed], "no such file"
    if name == "read-only output folder":
        if os.geteuid() == 0:  # root ignores file modes; /proc refuses new files for everyone
            return ["correct", good, "/proc/fixed.nii.gz", "--method", "classical"], "/proc"
        locked = out / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        return ["correct", good, locked / "fixed.nii.gz", "--method", "classical"], "not writable"
    if name == "output with unknown extension":
        return ["correct", good, out / "fixed.png"], "output format"
    if name == "output equal to the input":
        return ["correct", good, good, "--overwrite", "--method", "classical"], "is the input"
    if name == "mask of the wrong shape":
        return correct + ["--mask", _nifti(inp / "mask.nii.gz", np.ones((16, 16, 8), np.uint8))], "mask"
    if name == "mask on another grid":
        shifted = np.diag([1.0, 1.0, 2.0, 1.0])
        return correct + ["--mask", _nifti(inp / "mask.nii.gz", np.ones((32, 32, 12), np.uint8), shifted)], "geometry"
    if name == "unknown model name":
        return ["correct", good, fixed, "--model", "nope"], "unknown model"
    if name == "corrupt safetensors":
        (inp / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
        return ["correct", good, fixed, "--model", inp / "broken.safetensors"], "broken.safetensors"
    if name == "metal model as --model":
        metal = sorted(MODELS_DIR.glob("medinpaint-metal-*.safetensors"))[-1]
        return ["correct", good, fixed, "--model", metal.stem], "metal"
    if name in BAD_CONFIGS:
        text, expected = BAD_CONFIGS[name]
        (inp / "bad.yaml").write_text(text)
        return correct + ["--config", inp / "bad.yaml"], expected
    if name == "invalid --artifacts":
        return correct + ["--artifacts", "everything"], "invalid choice"
    if name == "--device cuda without CUDA":
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA, so --device cuda is valid here")
        return ["correct", good, fixed, "--device", "cuda"], "cuda"
    if name == "--slice-spacing -1":
        if build_parser().parse_known_args(["correct", "a", "b", "--slice-spacing", "1"])[1]:  # left unknown
            pytest.skip("correct has no --slice-spacing option yet")
        return ["correct", shared("ct_abdomen_dicom"), fixed, "--slice-spacing", "-1"], "positive"
    if name == "evaluate with mismatched grids":
        small = _nifti(inp / "small.nii.gz", _ct((16, 16, 12)))
        return ["evaluate", good, small, "--mask", good], "grid"
    if name == "batch with a missing input folder":
        return ["batch", inp / "no_such_folder", out / "batch"], "no such"
    raise ValueError(name)


CASES = [
    "truncated nifti", "empty .nii", "zero-byte .nii.gz", "not-gzip .nii.gz", "2D nifti", "4D nifti", "RGB nifti",
    "NaN-only volume", "all-constant volume", "one-position DICOM series", "two series without --series",
    "unknown --series UID", "secondary-capture screenshot file", "folder of a secondary-capture screenshot",
    "DICOM without pixel data", "folder without images", "non-existent input", "read-only output folder",
    "output with unknown extension", "output equal to the input", "mask of the wrong shape", "mask on another grid",
    "unknown model name", "corrupt safetensors", "metal model as --model", "config with a YAML syntax error",
    "config with an unknown key", "config with a wrong type", "config with 1e-3 (text to YAML)", "invalid --artifacts",
    "--device cuda without CUDA", "--slice-spacing -1", "evaluate with mismatched grids", "batch with a missing input folder",
]


def _digest(path: Path) -> dict[str, str]:
    """SHA-256 of every file under ``path`` (or of the file itself), by relative name."""
    path = Path(path)
    if path.is_file():
        return {path.name: sha256_file(path)}
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def corpus_dirs(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    yield tmp_path
    for folder in (tmp_path / "out").rglob("*"):  # let pytest clean up a folder made read-only
        if folder.is_dir():
            folder.chmod(0o755)


def _inputs_of(args: list) -> list[Path]:
    """The paths a case reads: its positional inputs and the files of --mask, --config, --model."""
    paths = [Path(a) for a in args[1:] if isinstance(a, Path)]
    return [p for p in paths if p.exists() and not str(p).startswith("/proc")]


@pytest.mark.parametrize("name", CASES)
def test_bad_input_gives_one_line_and_exit_2(cli, corpus_dirs, name):
    args, expected = _case(name, corpus_dirs)
    inputs = _inputs_of(args)
    before = {str(p): _digest(p) for p in inputs}
    listing_in, listing_out = files_under(corpus_dirs / "in"), files_under(corpus_dirs / "out")
    code, _, err = cli(*args, "--quiet")
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "internal error" not in lines[0] and "Traceback" not in err
    assert expected.lower() in lines[0].lower(), lines[0]
    assert files_under(corpus_dirs / "out") == listing_out  # nothing left behind, not even hidden partial files
    assert files_under(corpus_dirs / "in") == listing_in
    assert {str(p): _digest(p) for p in inputs} == before  # inputs byte for byte as they were


@pytest.mark.parametrize("name", ["RGB nifti", "invalid --artifacts"])  # each a process start (~6 s of CPU)
def test_bad_input_in_a_real_process(corpus_dirs, name):
    """The entry point itself: exit status 2 and exactly one stderr line, no traceback."""
    args, expected = _case(name, corpus_dirs)
    result = subprocess.run([sys.executable, "-m", "medinpaint", *map(str, args), "--quiet"],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected.lower() in lines[0].lower(), result.stderr
    assert files_under(corpus_dirs / "out") == []


def test_corpus_is_large_enough():
    assert len(CASES) >= 25 and len(set(CASES)) == len(CASES)
