"""Regenerate the decode-only DICOM fixtures of this folder (pydicom cannot encode these syntaxes).

A 64 x 64 crop of 3 neighbouring slices of ct_abdomen_dicom (real CT, Apache-2.0, see
../../../../shared/data/README.md) is written as a minimal CT series in each JPEG syntax by
libjpeg-turbo 3 (through imagecodecs: 8- and 12-bit lossy, and lossless), and the crop itself
is kept in source.npz, the truth the tests compare with.  GDCM was tried first: its lossy JPEG
of 12-bit data has 16-bit precision, which the standard (and libjpeg) refuse.

    .venv/bin/python -m pip install --target /tmp/ic imagecodecs   # the encoder; not a medinpaint dependency
    PYTHONPATH=/tmp/ic .venv/bin/python tests/data/dicom_syntaxes/make_fixtures.py [CT_DICOM_FOLDER]
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import imagecodecs
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID, generate_uid

HERE = Path(__file__).resolve().parent
DEFAULT_SOURCE = HERE.parents[2].parent / "shared" / "data" / "ct_abdomen_dicom"
SLICES = (9, 10, 11)  # k along the slice normal
ROWS, COLUMNS = slice(250, 314), slice(200, 264)  # spine and soft tissue: -138 .. 1238 HU
WINDOW_HU = (-160.0, 1240.0)  # 8-bit baseline JPEG: this window mapped to 0 .. 255
# folder -> (transfer syntax, stored bits, libjpeg-turbo options)
SYNTAXES = {
    "jpeg_lossless_p14": ("1.2.840.10008.1.2.4.57", 12, {"lossless": True, "predictor": 6}),  # any predictor
    "jpeg_lossless_sv1": ("1.2.840.10008.1.2.4.70", 12, {"lossless": True, "predictor": 1}),
    "jpeg_extended_12bit": ("1.2.840.10008.1.2.4.51", 12, {"level": 90}),
    "jpeg_baseline_8bit": ("1.2.840.10008.1.2.4.50", 8, {"level": 90}),
}


def source_crop(folder: Path) -> tuple[np.ndarray, list[Dataset]]:
    """The stored values (rows x columns) of the chosen slices and their headers, ordered along the normal."""
    headers = [pydicom.dcmread(p) for p in sorted(folder.iterdir())]
    iop = np.array([float(v) for v in headers[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    headers.sort(key=lambda ds: float(np.dot([float(v) for v in ds.ImagePositionPatient], normal)))
    chosen = [headers[k] for k in SLICES]
    return np.stack([ds.pixel_array[ROWS, COLUMNS] for ds in chosen]).astype(np.uint16), chosen


def window_8bit(stored12: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    lo, hi = WINDOW_HU
    return np.clip(np.rint((stored12 * slope + intercept - lo) / (hi - lo) * 255), 0, 255).astype(np.uint8)


def encoded_dataset(src: Dataset, stored: np.ndarray, name: str, index: int) -> Dataset:
    """A minimal CT slice holding the encoded crop, placed where the crop lies in the source."""
    syntax, bits, options = SYNTAXES[name]
    iop = [float(v) for v in src.ImageOrientationPatient]
    spacing = [float(v) for v in src.PixelSpacing]  # row spacing, column spacing
    corner = (np.array([float(v) for v in src.ImagePositionPatient])
              + COLUMNS.start * spacing[1] * np.array(iop[:3]) + ROWS.start * spacing[0] * np.array(iop[3:]))
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[name, str(index)])
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["medinpaint dicom_syntaxes study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[name])
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=["medinpaint dicom_syntaxes frame"])
    ds.PatientName, ds.PatientID, ds.Modality = "Anonymous^", "medinpaint-fixture", "CT"
    ds.SeriesDescription = f"ct_abdomen_dicom crop, {name}"
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient = [float(v) for v in np.round(corner, 6)]
    ds.ImageOrientationPatient = iop
    ds.PixelSpacing = spacing
    ds.SliceThickness = src.SliceThickness
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = (8 if bits == 8 else 16), bits, bits - 1, 0
    if bits == 8:
        lo, hi = WINDOW_HU
        ds.RescaleSlope, ds.RescaleIntercept = f"{(hi - lo) / 255:.10g}", f"{lo:.10g}"
    else:
        ds.RescaleSlope, ds.RescaleIntercept = src.RescaleSlope, src.RescaleIntercept
    ds.RescaleType = "HU"
    frame = imagecodecs.jpeg8_encode(stored, bitspersample=bits, **options)
    if not options.get("lossless"):
        ds.LossyImageCompression, ds.LossyImageCompressionMethod = "01", "ISO_10918_1"
        ds.LossyImageCompressionRatio = f"{stored.size * ds.BitsAllocated / 8 / len(frame):.4g}"
    ds.PixelData = encapsulate([bytes(frame)])
    ds["PixelData"].VR = "OB"
    return ds


def main(folder: Path) -> None:
    stored12, headers = source_crop(folder)
    slope, intercept = float(headers[0].RescaleSlope), float(headers[0].RescaleIntercept)
    stored8 = window_8bit(stored12, slope, intercept)
    np.savez_compressed(HERE / "source.npz", stored12=stored12, stored8=stored8, slope=slope, intercept=intercept)
    for name, (_, bits, _) in SYNTAXES.items():
        target = HERE / name
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir()
        for index, src in enumerate(headers):
            data = stored8[index] if bits == 8 else stored12[index]
            encoded_dataset(src, data, name, index).save_as(target / f"slice{index + 1}.dcm", enforce_file_format=True)
        print(name, pydicom.dcmread(target / "slice1.dcm").file_meta.TransferSyntaxUID.name)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_SOURCE)
