"""Find the volumes under a folder: image files by extension, DICOM series by folder."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


def _is_dicom(path: Path) -> bool:
    try:
        pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
        return True
    except (InvalidDicomError, OSError, EOFError, ValueError):
        return False


def find_cases(folder: Path) -> list[Path]:
    """Volume files, and every folder that directly holds DICOM files, sorted."""
    cases: list[Path] = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name.lower().endswith(VOLUME_SUFFIXES):
            cases.append(path)
        elif path.is_dir() and any(_is_dicom(f) for f in sorted(path.iterdir()) if f.is_file()):
            cases.append(path)
    if any(_is_dicom(f) for f in sorted(folder.iterdir()) if f.is_file()):
        cases.insert(0, folder)
    return cases
