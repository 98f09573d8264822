"""``load(path)``: one entry point for NIfTI, NRRD/MHA and DICOM (series or multi-frame)."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from medinpaint.data.dicom_series import read_dicom
from medinpaint.data.volume import Source, Volume, affine_from_itk
from medinpaint.errors import MedinpaintError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = {".nrrd": "nrrd", ".nhdr": "nrrd", ".mha": "mha", ".mhd": "mha"}


def format_of(path: Path) -> str:
    """The format a file name asks for: nifti, nrrd, mha, or dicom (a folder or .dcm)."""
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    for suffix, fmt in ITK_SUFFIXES.items():
        if name.endswith(suffix):
            return fmt
    if path.is_dir() or name.endswith(".dcm") or path.suffix == "":
        return "dicom"
    raise MedinpaintError(
        f"{path}: unknown format {path.suffix!r}; use .nii, .nii.gz, .nrrd, .mha, or a DICOM folder"
    )


def load(path: str | Path, series: str | None = None, modality: str | None = None,
         slice_spacing: float | None = None) -> Volume:
    """Read a 3D volume with its exact geometry; raise MedinpaintError on anything unusable.

    ``series`` picks one SeriesInstanceUID in a folder holding several.  ``modality``
    ("CT"/"MR") overrides a guess for formats that do not record it.  ``slice_spacing`` (mm)
    sets the slice grid of a DICOM series instead of its most common step (see dicom_series).
    """
    path = Path(path)
    if not path.exists():
        raise MedinpaintError(f"{path}: no such file or folder")
    fmt = format_of(path)
    if slice_spacing is not None and fmt != "dicom":
        raise MedinpaintError(f"{path}: --slice-spacing applies to DICOM series; a {fmt.upper()} file already holds a regular grid")
    if fmt == "dicom":
        volume = read_dicom(path, series, slice_spacing)
    elif fmt == "nifti":
        volume = _read_nifti(path)
    else:
        volume = _read_itk(path, fmt)
    if modality:
        volume.modality = modality.upper()
    elif volume.modality == "OT":
        volume.modality = guess_modality(volume.array)
    _check_usable(volume, path)
    return volume


def guess_modality(array: np.ndarray) -> str:
    """CT if the values look like Hounsfield units (air near -1000), else MR."""
    sample = array[::2, ::2] if array.size > 2**24 else array  # the percentile, without a full copy
    finite = sample[np.isfinite(sample)]
    if finite.size and np.percentile(finite, 1) < -500 and finite.max() < 40000:
        return "CT"
    return "MR"


def _squeeze_to_3d(array: np.ndarray, path: Path) -> np.ndarray:
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2 or (array.ndim == 3 and min(array.shape) == 1):
        raise MedinpaintError(f"{path}: a 2D image (shape {array.shape}); medinpaint needs a 3D volume")
    if array.ndim != 3:
        raise MedinpaintError(
            f"{path}: a {array.ndim}D image (shape {array.shape}); pass one 3D volume "
            "(split time series or multi-channel images first)"
        )
    return array


def _read_nifti(path: Path) -> Volume:
    try:
        image = nib.load(str(path))
        array = np.asanyarray(image.dataobj)
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile, ValueError, nib.filebasedimages.ImageFileError) as exc:
        raise MedinpaintError(f"{path}: cannot read NIfTI ({exc})") from None
    if array.dtype.fields or np.iscomplexobj(array):  # RGB24/RGBA32 or complex: no single intensity per voxel
        raise MedinpaintError(f"{path}: an RGB (colour) or complex NIfTI image ({array.dtype}); medinpaint needs a scalar volume")
    array = _squeeze_to_3d(array, path)
    header = image.header
    stored = str(header.get_data_dtype())
    slope, inter = header.get_slope_inter()
    if slope not in (None, 1.0) or inter not in (None, 0.0):
        stored = "float32"
    return Volume(
        array=array.astype(np.float32, copy=False),
        affine=image.affine,
        source=Source(path=path, format="nifti", stored_dtype=stored,
                      description=header["descrip"].tobytes().split(b"\0")[0].decode("latin-1")),
    )


def _read_itk(path: Path, fmt: str) -> Volume:
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unreadable"
        raise MedinpaintError(f"{path}: cannot read {fmt.upper()} ({first_line})") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise MedinpaintError(f"{path}: a multi-component (vector or RGB) image; medinpaint needs a scalar volume")
    if image.GetDimension() != 3:
        raise MedinpaintError(f"{path}: a {image.GetDimension()}D image; medinpaint needs a 3D volume")
    array = np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))
    _squeeze_to_3d(array, path)
    return Volume(
        array=array.astype(np.float32, copy=False),
        affine=affine_from_itk(image.GetSpacing(), image.GetOrigin(), image.GetDirection()),
        source=Source(path=path, format=fmt, stored_dtype=str(array.dtype)),
    )


def _check_usable(volume: Volume, path: Path) -> None:
    if np.linalg.matrix_rank(volume.affine[:3, :3]) < 3 or not np.all(np.isfinite(volume.affine)):
        raise MedinpaintError(f"{path}: degenerate voxel-to-world matrix; the geometry is unusable")
    acquired = np.ones(volume.shape[2], dtype=bool)
    acquired[list(volume.placeholder_slices)] = False
    if not np.isfinite(volume.array[:, :, acquired]).any():
        raise MedinpaintError(f"{path}: every voxel is NaN or infinite; nothing to repair from")
