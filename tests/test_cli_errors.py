"""Bad input or usage: exit 2, one ``error:`` line, no traceback, nothing left behind."""

from __future__ import annotations

import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from conftest import REPO, SAMPLE, files_under, shared


def _nifti(path, array):
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=np.float32), np.eye(4)), str(path))
    return path


def _bad_input(kind: str, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    if kind == "missing path":
        return inputs / "nope.nii.gz", "no such file"
    if kind == "truncated nifti":
        data = (SAMPLE / "ct_abdomen_3mm.nii.gz").read_bytes()
        path = inputs / "truncated.nii.gz"
        path.write_bytes(data[: len(data) // 2])
        return path, "truncated"
    if kind == "2D image":
        return _nifti(inputs / "flat.nii.gz", np.random.rand(64, 64)), "2D"
    if kind == "4D image":
        return _nifti(inputs / "four.nii.gz", np.random.rand(16, 16, 16, 3)), "4D"
    if kind == "NaN volume":
        return _nifti(inputs / "nan.nii.gz", np.full((16, 16, 16), np.nan)), "every voxel is NaN"
    if kind == "one-position series":
        return shared("io_edge_cases/failing_notavolume_001"), "position"
    if kind == "two series":
        folder = inputs / "two"
        folder.mkdir()
        for src in ("failing_gantrytilting_001", "failing_slicecount_001"):
            for f in shared(f"io_edge_cases/{src}").iterdir():
                (folder / f"{src}_{f.name}").write_bytes(f.read_bytes())
        return folder, "--series"
    raise ValueError(kind)


KINDS = ["missing path", "truncated nifti", "2D image", "4D image", "NaN volume", "one-position series", "two series"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("output", ["fixed.nii.gz", "fixed_dicom"])
def test_bad_input_exits_2_with_one_line(cli, tmp_path, kind, output):
    source, expected = _bad_input(kind, tmp_path)
    outdir = tmp_path / "out"
    outdir.mkdir()
    before = files_under(tmp_path / "inputs")
    code, out, err = cli("correct", source, outdir / output, "--method", "classical")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in err
    assert files_under(outdir) == []  # nothing left behind, not even hidden partial files
    assert files_under(tmp_path / "inputs") == before


def test_unwritable_output_folder(cli, tmp_path):
    if os.geteuid() == 0:
        target = "/proc"  # root ignores file modes; /proc refuses new files for everyone
    else:
        target = tmp_path / "readonly"
        target.mkdir()
        target.chmod(0o555)
    code, _, err = cli("correct", SAMPLE / "ct_abdomen_3mm_damaged.nii.gz", f"{target}/fixed.nii.gz", "--method", "classical")
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert "cannot create files" in err or "not writable" in err
    if os.geteuid() != 0:
        assert files_under(target) == []


@pytest.mark.parametrize("args, expected", [
    (["correct"], "required"),
    (["correct", "a.nii.gz", "b.png"], "output format"),
    (["correct", "a.nii.gz", "b.nii.gz", "--method", "magic"], "invalid choice"),
    (["frobnicate"], "invalid choice"),
    (["evaluate", "a.nii.gz", "b.nii.gz"], "--mask"),
])
def test_usage_errors(cli, args, expected):
    code, _, err = cli(*args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err, err


def test_real_process_prints_no_traceback(tmp_path):
    """The installed entry point, not just main(): one line on stderr and exit status 2."""
    result = subprocess.run(
        [sys.executable, "-m", "medinpaint", "correct", str(tmp_path / "missing.nii.gz"), str(tmp_path / "o.nii.gz")],
        capture_output=True, text=True, cwd=REPO,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing.nii.gz'}: no such file or folder"]
    assert files_under(tmp_path) == []
