"""Read a DICOM series (classic one-file-per-slice or enhanced multi-frame) into a Volume.

Slices are ordered by their position along the slice normal, never by file name or
instance number.  Gaps in the positions become NaN placeholder slices on the regular
grid and are reported in ``Volume.placeholder_slices``.  A gantry-tilted stack is kept
oblique: the k column of the affine is the true step between slice origins.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from medinpaint.data.volume import LPS_TO_RAS, Source, Volume
from medinpaint.errors import MedinpaintError

# Storage classes that hold no image volume of their own (SEG, SR, presentation states ...).
_NON_VOLUME_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
    "1.2.840.10008.5.1.4.1.1.66.7",  # Label Map Segmentation
    "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.11.1",  # Grayscale Softcopy Presentation State
}
_POSITION_TOL_MM = 1e-3
_SPACING_TOL = 0.02  # fraction of the slice step that a gap may deviate from a whole number


@dataclass
class _Slice:
    path: Path
    frame: int | None  # 0-based frame of an enhanced multi-frame file, None for classic files
    position: np.ndarray  # ImagePositionPatient (LPS mm)
    orientation: np.ndarray  # ImageOrientationPatient, 6 values
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing)
    rows: int
    columns: int
    slope: float
    intercept: float


def list_series(folder: Path) -> dict[str, list[pydicom.Dataset]]:
    """Headers of every image DICOM file under ``folder`` (recursive), grouped by series UID."""
    series: dict[str, list[pydicom.Dataset]] = defaultdict(list)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError, AttributeError, KeyError):
            continue
        sop_class = str(ds.get("SOPClassUID", ""))
        if sop_class in _NON_VOLUME_SOP_CLASSES or "Rows" not in ds or "SeriesInstanceUID" not in ds:
            continue
        ds.filename = str(path)
        series[str(ds.SeriesInstanceUID)].append(ds)
    return dict(series)


def summarize_series(headers: list[pydicom.Dataset]) -> str:
    first = headers[0]
    frames = sum(int(h.get("NumberOfFrames", 1) or 1) for h in headers)
    desc = str(first.get("SeriesDescription", "")).strip()
    return f"{first.SeriesInstanceUID} ({first.get('Modality', '?')}, {frames} images{', ' + repr(desc) if desc else ''})"


def read_dicom(path: Path, series_uid: str | None = None) -> Volume:
    """Load one series from a folder (or one enhanced multi-frame file)."""
    if path.is_file():
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
            raise MedinpaintError(f"{path}: not a readable DICOM file ({exc})") from None
        header.filename = str(path)
        if int(header.get("NumberOfFrames", 1) or 1) < 2:
            raise MedinpaintError(
                f"{path}: a single-frame DICOM file is a 2D image; pass the folder holding its series"
            )
        headers = [header]
    else:
        all_series = list_series(path)
        if not all_series:
            raise MedinpaintError(f"{path}: no DICOM image files found")
        if series_uid is not None:
            if series_uid not in all_series:
                raise MedinpaintError(
                    f"{path}: no series {series_uid}; found: "
                    + "; ".join(summarize_series(h) for h in all_series.values())
                )
            headers = all_series[series_uid]
        elif len(all_series) > 1:
            raise MedinpaintError(
                f"{path} holds {len(all_series)} series; choose one with --series UID: "
                + "; ".join(summarize_series(h) for h in all_series.values())
            )
        else:
            headers = next(iter(all_series.values()))
    return _assemble(headers)


def _slices_of(ds: pydicom.Dataset) -> list[_Slice]:
    path = Path(ds.filename)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if n_frames > 1 or "PerFrameFunctionalGroupsSequence" in ds:
        return _frames_of(ds, path, n_frames)
    for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if tag not in ds:
            raise MedinpaintError(f"{path}: missing {tag}; cannot place the slice in space")
    return [
        _Slice(
            path=path,
            frame=None,
            position=np.array([float(v) for v in ds.ImagePositionPatient]),
            orientation=np.array([float(v) for v in ds.ImageOrientationPatient]),
            pixel_spacing=(float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])),
            rows=int(ds.Rows),
            columns=int(ds.Columns),
            slope=float(ds.get("RescaleSlope", 1) or 1),
            intercept=float(ds.get("RescaleIntercept", 0) or 0),
        )
    ]


def _functional(ds: pydicom.Dataset, frame: int, sequence: str, attribute: str):
    """Look an attribute up in the per-frame, then the shared functional groups."""
    for groups in (ds.get("PerFrameFunctionalGroupsSequence"), ds.get("SharedFunctionalGroupsSequence")):
        if not groups:
            continue
        item = groups[frame] if groups is ds.get("PerFrameFunctionalGroupsSequence") else groups[0]
        if sequence in item and attribute in item[sequence][0]:
            return item[sequence][0][attribute].value
    return None


def _frames_of(ds: pydicom.Dataset, path: Path, n_frames: int) -> list[_Slice]:
    out = []
    for f in range(n_frames):
        position = _functional(ds, f, "PlanePositionSequence", "ImagePositionPatient")
        orientation = _functional(ds, f, "PlaneOrientationSequence", "ImageOrientationPatient")
        spacing = _functional(ds, f, "PixelMeasuresSequence", "PixelSpacing")
        if position is None or orientation is None or spacing is None:
            raise MedinpaintError(f"{path}: frame {f + 1} lacks its plane position, orientation or pixel spacing")
        slope = _functional(ds, f, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _functional(ds, f, "PixelValueTransformationSequence", "RescaleIntercept")
        out.append(
            _Slice(
                path=path,
                frame=f,
                position=np.array([float(v) for v in position]),
                orientation=np.array([float(v) for v in orientation]),
                pixel_spacing=(float(spacing[0]), float(spacing[1])),
                rows=int(ds.Rows),
                columns=int(ds.Columns),
                slope=float(slope if slope is not None else ds.get("RescaleSlope", 1) or 1),
                intercept=float(intercept if intercept is not None else ds.get("RescaleIntercept", 0) or 0),
            )
        )
    return out


def _assemble(headers: list[pydicom.Dataset]) -> Volume:
    slices = [s for ds in headers for s in _slices_of(ds)]
    first = slices[0]
    where = Path(headers[0].filename).parent
    for s in slices:
        if not np.allclose(s.orientation, first.orientation, atol=1e-4):
            raise MedinpaintError(f"{where}: slices of the series have different orientations; not one volume")
        if (s.rows, s.columns) != (first.rows, first.columns):
            raise MedinpaintError(f"{where}: slices of the series have different sizes; not one volume")
        if not np.allclose(s.pixel_spacing, first.pixel_spacing, atol=1e-4):
            raise MedinpaintError(f"{where}: slices of the series have different pixel spacings; not one volume")

    row_dir, col_dir = first.orientation[:3], first.orientation[3:]
    normal = np.cross(row_dir, col_dir)
    slices.sort(key=lambda s: float(np.dot(s.position, normal)))
    heights = np.array([float(np.dot(s.position, normal)) for s in slices])
    distinct = np.unique(np.round(heights / _POSITION_TOL_MM).astype(np.int64))
    if len(distinct) < len(slices):
        raise MedinpaintError(
            f"{where}: {len(slices) - len(distinct) + 1} images share one slice position "
            f"({len(slices)} images, {len(distinct)} distinct positions); not a single volume "
            "(several phases, echoes or a localizer?)"
        )
    if len(slices) < 2:
        raise MedinpaintError(f"{where}: only one slice; a 2D image is not a volume")

    steps = np.diff(heights)
    base = float(steps.min())
    multiples = steps / base
    rounded = np.round(multiples)
    if np.any(np.abs(multiples - rounded) > _SPACING_TOL):
        raise MedinpaintError(
            f"{where}: irregular slice spacing (steps {sorted(set(np.round(steps, 3).tolist()))} mm); "
            "not a regular grid"
        )
    grid_index = np.concatenate([[0], np.cumsum(rounded).astype(int)])
    n_k = int(grid_index[-1]) + 1
    step = (slices[-1].position - slices[0].position) / (n_k - 1)
    for s, g in zip(slices, grid_index):
        if np.linalg.norm(slices[0].position + g * step - s.position) > 0.01 * max(base, 1.0):
            raise MedinpaintError(f"{where}: slice origins do not lie on one line; not a regular volume")

    lps = np.eye(4)
    lps[:3, 0] = row_dir * first.pixel_spacing[1]  # i runs along a row (column index)
    lps[:3, 1] = col_dir * first.pixel_spacing[0]  # j runs down a column (row index)
    lps[:3, 2] = step
    lps[:3, 3] = slices[0].position
    affine = LPS_TO_RAS @ lps

    array = np.full((first.columns, first.rows, n_k), np.nan, dtype=np.float32)
    raw_min, raw_max, integral = np.inf, -np.inf, True
    pixel_cache: dict[Path, np.ndarray] = {}
    for s, g in zip(slices, grid_index):
        if s.path not in pixel_cache:
            try:
                pixel_cache[s.path] = pydicom.dcmread(s.path).pixel_array
            except Exception as exc:  # decoder errors come in many types
                raise MedinpaintError(f"{s.path}: cannot decode pixel data ({exc})") from None
        pixels = pixel_cache[s.path]
        frame = pixels[s.frame] if s.frame is not None else pixels
        if frame.ndim != 2:
            raise MedinpaintError(f"{s.path}: pixel data is not a grayscale image (shape {frame.shape})")
        values = frame.astype(np.float64) * s.slope + s.intercept
        array[:, :, g] = values.T
        raw_min, raw_max = min(raw_min, values.min()), max(raw_max, values.max())
        integral = integral and float(s.slope).is_integer() and float(s.intercept).is_integer()

    placeholders = tuple(int(k) for k in sorted(set(range(n_k)) - set(grid_index.tolist())))
    files: list[Path | None] = [None] * n_k
    frames: list[int | None] = [None] * n_k
    for s, g in zip(slices, grid_index):
        files[g], frames[g] = s.path, s.frame
    ds0 = headers[0]
    return Volume(
        array=array,
        affine=affine,
        modality=str(ds0.get("Modality", "OT")) or "OT",
        source=Source(
            path=Path(where if len(headers) > 1 else headers[0].filename),
            format="dicom",
            stored_dtype=_stored_dtype(raw_min, raw_max, integral),
            series_uid=str(ds0.SeriesInstanceUID),
            slice_files=tuple(files),
            slice_frames=tuple(frames),
            description=str(ds0.get("SeriesDescription", "")),
        ),
        placeholder_slices=placeholders,
    )


def _stored_dtype(lo: float, hi: float, integral: bool) -> str:
    if integral:
        for dtype in ("uint8", "int16", "uint16", "int32"):
            info = np.iinfo(dtype)
            if info.min <= lo and hi <= info.max:
                return dtype
    return "float32"
