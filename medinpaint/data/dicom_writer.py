"""Write a corrected volume as a derived DICOM series, and its synthesized mask as a DICOM SEG.

The derived series keeps patient, study and frame of reference, gets new Series and
SOP Instance UIDs, ImageType DERIVED\\SECONDARY, a DerivationDescription and a
SourceImageSequence pointing at each original slice (with its frame number when the source
is a multi-frame file).  Slices that had no acquisition (placeholders) reference nothing and
say so in ImageComments.  Slices without a file of their own (placeholders, and grid slices
resampled between irregularly spaced ones) copy the header of the nearest acquired slice, so
they get their own position attributes: its position, slice location and acquisition time are
not theirs.
The SEG is built by highdicom, which validates it on construction.
"""

from __future__ import annotations

import copy
import warnings
from datetime import datetime
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DSfloat

from medinpaint import __version__
from medinpaint.artifacts.labels import LABEL_NAMES
from medinpaint.data.volume import LPS_TO_RAS, Volume

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
_PER_INSTANCE = (
    "PixelData", "SmallestImagePixelValue", "LargestImagePixelValue", "WindowCenterWidthExplanation",
    "NumberOfFrames", "PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence",
    "SourceImageSequence", "ReferencedImageSequence", "DerivationCodeSequence", "IconImageSequence",
)
# Patient-space points of the acquired slice that move with the slice (CT Image module).
_SLICE_POINTS = ("DataCollectionCenterPatient", "ReconstructionTargetCenterPatient")
# When the slice was acquired: a slice without a file of its own drops its neighbour's.
_ACQUISITION_TIMES = ("AcquisitionTime", "AcquisitionDateTime", "TriggerTime")


def _template(volume: Volume, k: int) -> Dataset | None:
    """The original classic slice k (or the nearest acquired one for a placeholder)."""
    src = volume.source
    if src is None or src.format != "dicom" or not src.slice_files or any(f is not None for f in src.slice_frames):
        return None
    acquired = [i for i, f in enumerate(src.slice_files) if f is not None]
    nearest = min(acquired, key=lambda i: abs(i - k))
    return pydicom.dcmread(src.slice_files[nearest], stop_before_pixels=True)


def _study_header(volume: Volume) -> Dataset | None:
    src = volume.source
    if src is not None and src.format == "dicom":
        first = next(f for f in src.slice_files if f is not None)
        return pydicom.dcmread(first, stop_before_pixels=True)
    return None


def _new_base(volume: Volume, header: Dataset | None) -> Dataset:
    """Minimal CT/MR image for inputs that were not classic DICOM; patient/study kept when known."""
    ds = Dataset()
    ds.SOPClassUID = {"CT": CT_IMAGE_STORAGE, "MR": MR_IMAGE_STORAGE}.get(volume.modality, SECONDARY_CAPTURE)
    ds.Modality = volume.modality if volume.modality in ("CT", "MR") else "OT"
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                    "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName", "FrameOfReferenceUID",
                    "StudyDescription"):
        if header is not None and keyword in header:
            setattr(ds, keyword, header[keyword].value)
    _ensure_patient_and_study(ds)
    ds.Manufacturer = "medinpaint"
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    if ds.Modality == "CT":
        ds.KVP = ""
        ds.AcquisitionNumber = 1
    if ds.Modality == "MR":
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions = "RM", "NONE", ""
        ds.MRAcquisitionType, ds.EchoTime, ds.RepetitionTime, ds.EchoTrainLength = "3D", "", "", ""
    return ds


def _ensure_patient_and_study(ds: Dataset) -> None:
    """Fill the type-2 patient/study attributes that anonymised sources often drop (SEG needs them)."""
    defaults = {
        "PatientName": "Anonymous^", "PatientID": "medinpaint", "PatientBirthDate": "", "PatientSex": "",
        "StudyID": "1", "AccessionNumber": "", "ReferringPhysicianName": "",
        "StudyDate": datetime.now().strftime("%Y%m%d"), "StudyTime": datetime.now().strftime("%H%M%S"),
    }
    for keyword, value in defaults.items():
        if keyword not in ds:
            setattr(ds, keyword, value)


def _ds(values) -> list[DSfloat]:
    """Decimal strings of at most 16 characters (a longer DS is invalid DICOM)."""
    return [DSfloat(float(v), auto_format=True) for v in values]


def _slice_location_step(sources: tuple, step: np.ndarray, normal: np.ndarray) -> float:
    """SliceLocation change per k, as the source's first and last acquired slices have it.

    Vendors differ (a tilted GE stack steps it along the table, 4.22 mm for 4 mm slices at
    18.5 degrees; others along the slice normal), so it is taken from the source when it can be.
    """
    acquired = [(k, f) for k, f in enumerate(sources) if f is not None]
    if len(acquired) > 1 and acquired[0][1] != acquired[-1][1]:  # two classic files, not one multi-frame
        try:
            first, last = (float(pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SliceLocation"]).SliceLocation)
                           for _, f in (acquired[0], acquired[-1]))
            return (last - first) / (acquired[-1][0] - acquired[0][0])
        except (AttributeError, TypeError, ValueError):  # absent or empty in the source
            pass
    return float(np.dot(step, normal))


def _place_slice(ds: Dataset, position: np.ndarray, step: np.ndarray, location_step: float, normal: np.ndarray,
                 moved: bool) -> None:
    """Set the position attributes of the slice at ``position`` (LPS mm; ``step``: one k).

    ``moved``: the header was copied from another slice (the nearest acquired one), so its
    SliceLocation moves by ``location_step`` per k and its patient-space centres by the shift
    between the two positions.  Without a SliceLocation to move, it is the position along the normal.
    """
    shift = position - np.array([float(v) for v in ds.ImagePositionPatient]) if "ImagePositionPatient" in ds else None
    if moved and shift is not None:
        if ds.get("SliceLocation") not in (None, ""):
            ks = float(np.dot(shift, step) / np.dot(step, step))  # k steps from the copied slice
            ds.SliceLocation = _ds([float(ds.SliceLocation) + ks * location_step])[0]
        for keyword in _SLICE_POINTS:
            if keyword in ds and len(ds[keyword].value) == 3:
                ds[keyword].value = _ds(np.array([float(v) for v in ds[keyword].value]) + shift)
        for keyword in _ACQUISITION_TIMES:
            if keyword in ds:
                delattr(ds, keyword)
    if "SliceLocation" not in ds:
        ds.SliceLocation = _ds([float(np.dot(position, normal))])[0]
    ds.ImagePositionPatient = _ds(position)


def _pixel_encoding(template: Dataset | None, values: np.ndarray) -> tuple[float, float, bool, int]:
    """(slope, intercept, signed, bits): keep the original encoding when there is one."""
    if template is not None and "BitsAllocated" in template and int(template.BitsAllocated) == 16:
        return (float(template.get("RescaleSlope", 1) or 1), float(template.get("RescaleIntercept", 0) or 0),
                bool(template.get("PixelRepresentation", 0)), 16)
    lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    integral = np.allclose(values, np.rint(values), atol=1e-3)
    if integral and -32768 <= lo and hi <= 32767:
        return 1.0, 0.0, True, 16
    slope = max((hi - lo) / 65000.0, 1e-6)
    return slope, lo + 32768 * slope, True, 16


def write_dicom_series(
    volume: Volume,
    folder: Path,
    synthesized: np.ndarray,
    description: str,
) -> list[Dataset]:
    """Write one file per k-slice into ``folder``; return the datasets (for the SEG)."""
    header = _study_header(volume)
    series_uid = generate_uid()
    lps = LPS_TO_RAS @ volume.affine
    spacing = volume.spacing
    row_dir = lps[:3, 0] / spacing[0]
    col_dir = lps[:3, 1] / spacing[1]
    normal = np.cross(row_dir, col_dir)
    sources = volume.source.slice_files if volume.source and volume.source.format == "dicom" else ()
    frames = volume.source.slice_frames if sources else ()
    location_step = _slice_location_step(sources, lps[:3, 2], normal)
    placeholders = set(volume.placeholder_slices)
    now = datetime.now()
    # Inputs without a DICOM header get one new study and frame of reference for the whole series.
    shared_ids = {"StudyInstanceUID": generate_uid(), "FrameOfReferenceUID": generate_uid()}
    written = []
    for k in range(volume.shape[2]):
        template = _template(volume, k)
        if template is not None:
            ds = copy.deepcopy(template)
            for keyword in _PER_INSTANCE:
                if keyword in ds:
                    delattr(ds, keyword)
            if not ds.get("SOPClassUID"):  # some anonymisers empty it; the file meta still knows
                meta = getattr(template, "file_meta", None)
                ds.SOPClassUID = (meta.get("MediaStorageSOPClassUID") if meta else None) or {
                    "CT": CT_IMAGE_STORAGE, "MR": MR_IMAGE_STORAGE}.get(volume.modality, SECONDARY_CAPTURE)
        else:
            ds = _new_base(volume, header)
        for keyword, uid in shared_ids.items():
            if keyword not in ds:
                setattr(ds, keyword, uid)
        _ensure_patient_and_study(ds)
        values = volume.array[:, :, k].T  # rows run along j
        slope, intercept, signed, bits = _pixel_encoding(template, volume.array)
        stored = np.rint((values - intercept) / slope)
        dtype = np.int16 if signed else np.uint16
        info = np.iinfo(dtype)
        stored = np.clip(stored, info.min, info.max).astype(dtype)

        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.SeriesNumber = int(header.get("SeriesNumber", 0) or 0) + 1000 if header is not None else 1000
        ds.InstanceNumber = k + 1
        original = str(header.get("SeriesDescription", "")) if header is not None else ""
        ds.SeriesDescription = (original + " " if original else "") + "[medinpaint corrected]"
        image_type = list(template.get("ImageType", [])) if template is not None else []
        ds.ImageType = ["DERIVED", "SECONDARY"] + image_type[2:]
        ds.DerivationDescription = description[:1024]
        ds.SeriesDate, ds.SeriesTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
        ds.ContentDate, ds.ContentTime = ds.SeriesDate, ds.SeriesTime
        ds.SoftwareVersions = f"medinpaint {__version__}"
        _place_slice(ds, lps[:3, 3] + k * lps[:3, 2], lps[:3, 2], location_step, normal,
                     moved=template is not None and sources[k] is None)
        ds.ImageOrientationPatient = _ds(np.concatenate([row_dir, col_dir]))
        ds.PixelSpacing = _ds([spacing[1], spacing[0]])
        if "SliceThickness" not in ds:
            ds.SliceThickness = _ds([abs(np.dot(lps[:3, 2], normal))])[0]
        ds.Rows, ds.Columns = int(values.shape[0]), int(values.shape[1])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
        ds.PixelRepresentation = int(signed)
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}", f"{intercept:.10g}"
        ds.RescaleType = "HU" if ds.get("Modality") == "CT" else "US"
        n_synth = int((synthesized[:, :, k] > 0).sum())  # labels, not 0/1: count the voxels
        if k in placeholders:
            ds.ImageComments = "medinpaint: slice absent from the acquisition; every voxel is synthesized"
        elif n_synth:
            ds.ImageComments = f"medinpaint: {n_synth} synthesized voxels in this slice (see SEG)"
        elif "ImageComments" in ds:
            del ds.ImageComments
        if sources and sources[k] is not None and k not in placeholders:
            original_ds = pydicom.dcmread(sources[k], stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
            ref = Dataset()
            ref.ReferencedSOPClassUID = original_ds.get("SOPClassUID") or ds.SOPClassUID
            ref.ReferencedSOPInstanceUID = original_ds.SOPInstanceUID
            if k < len(frames) and frames[k] is not None:  # a frame of a multi-frame file: say which (1-based)
                ref.ReferencedFrameNumber = int(frames[k]) + 1
            ds.SourceImageSequence = Sequence([ref])
        ds.add_new(0x7FE00010, "OW", stored.tobytes())  # explicit VR: templates read as implicit VR leave it ambiguous
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
        ds.save_as(folder / f"IM{k + 1:05d}.dcm", enforce_file_format=True)
        written.append(ds)
    return written


def write_seg(images: list[Dataset], labels: np.ndarray, path: Path) -> None:
    """Synthesized voxels as a labelled DICOM SEG referencing the derived series."""
    present = [int(v) for v in np.unique(labels) if v > 0]
    if not present:
        return
    algorithm = hd.AlgorithmIdentificationSequence(
        name="medinpaint", version=__version__, family=codes.cid7162.ArtificialIntelligence
    )
    category = hd.sr.CodedConcept("synthesized", "99MEDINPAINT", "Synthesized image region")
    segments, frames = [], np.zeros((labels.shape[2], labels.shape[1], labels.shape[0]), dtype=np.uint8)
    for number, value in enumerate(present, start=1):
        name = LABEL_NAMES[value]
        segments.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=f"synthesized: {name}"[:64],
                segmented_property_category=category,
                segmented_property_type=hd.sr.CodedConcept(name[:16], "99MEDINPAINT", name.replace("_", " ")),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
            )
        )
        frames[np.transpose(labels, (2, 1, 0)) == value] = number
    with warnings.catch_warnings():  # names like "dicom2nifti" in anonymised sources are not ours to fix
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name.*")
        seg = _segmentation(images, frames, segments)
    seg.save_as(path)


def _segmentation(images: list[Dataset], frames: np.ndarray, segments: list) -> hd.seg.Segmentation:
    return hd.seg.Segmentation(
        source_images=images,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments,
        series_instance_uid=generate_uid(),
        series_number=int(images[0].SeriesNumber) + 1,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="medinpaint",
        manufacturer_model_name="medinpaint",
        software_versions=__version__,
        device_serial_number="0",
        series_description="medinpaint synthesized voxels",
    )
