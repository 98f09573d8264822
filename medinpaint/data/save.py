"""Write a Volume as NIfTI, NRRD or MHA with its exact geometry, in the original dtype when it fits."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from medinpaint.data.volume import Volume, itk_geometry
from medinpaint.errors import MedinpaintError


def storable_array(array: np.ndarray, dtype: str | None) -> np.ndarray:
    """Cast to ``dtype`` (rounding) when every value fits, else keep float32."""
    if dtype is None or not np.issubdtype(np.dtype(dtype), np.integer):
        return array.astype(np.float32, copy=False)
    if not np.all(np.isfinite(array)):
        return array.astype(np.float32, copy=False)
    info = np.iinfo(dtype)
    if np.rint(array.min()) < info.min or np.rint(array.max()) > info.max:
        return array.astype(np.float32, copy=False)
    out = np.empty(array.shape, dtype=dtype)
    for k in range(0, array.shape[-1], 16):  # slab by slab: no float copy of the whole volume
        out[..., k : k + 16] = np.rint(array[..., k : k + 16])
    return out


def write_file(volume: Volume, path: Path, fmt: str, dtype: str | None = None, description: str = "") -> None:
    """Write to exactly ``path`` (the caller stages it); ``fmt`` is nifti, nrrd or mha."""
    data = storable_array(volume.array, dtype)
    if fmt == "nifti":
        image = nib.Nifti1Image(data, volume.affine)
        image.header.set_xyzt_units("mm")
        image.header.set_sform(volume.affine, code="scanner")
        image.header.set_qform(volume.affine, code="scanner")
        if description:
            image.header["descrip"] = description.encode("latin-1", "replace")[:79]
        if volume.modality == "CT" and np.issubdtype(data.dtype, np.integer):
            image.header["cal_min"], image.header["cal_max"] = float(data.min()), float(data.max())
        nib.save(image, str(path))
    elif fmt in ("nrrd", "mha"):
        image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(data, (2, 1, 0))))
        spacing, origin, direction = itk_geometry(volume.affine)
        image.SetSpacing(spacing)
        image.SetOrigin(origin)
        image.SetDirection(direction)
        writer = sitk.ImageFileWriter()
        writer.SetFileName(str(path))
        writer.SetImageIO("NrrdImageIO" if fmt == "nrrd" else "MetaImageIO")
        writer.SetUseCompression(True)
        if description:
            image.SetMetaData("medinpaint", description)
        try:
            writer.Execute(image)
        except RuntimeError as exc:
            raise MedinpaintError(f"{path}: cannot write {fmt.upper()} ({str(exc).strip().splitlines()[-1]})") from None
    else:
        raise ValueError(f"not a file format: {fmt}")
