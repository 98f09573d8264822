"""Read a DICOM series (classic one-file-per-slice or enhanced multi-frame) into a Volume.

Slices are ordered by their position along the slice normal, never by file name or
instance number, and put on a regular grid (``_plan_grid``): the grid step is the most
common step between slices (ties: the smaller, so the finer part keeps its resolution) or
the user's ``slice_spacing``.  Acquired slices on a grid position are kept as read; a
position with an acquired slice in its cell but off the position is resampled linearly
along the normal (``Volume.resampled_slices``); an empty position is a NaN placeholder
(``Volume.placeholder_slices``), as is a gap in a regular series.  A gantry-tilted stack
is kept oblique: the k column of the affine is the true step along the line of origins.
MONOCHROME1 pixels are inverted as highdicom does, except rescaled Hounsfield units.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import logging
import math

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder

from medinpaint.data.volume import LPS_TO_RAS, Source, Volume
from medinpaint.errors import MedinpaintError

log = logging.getLogger(__name__)
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
_SAME_STEP = 0.02  # steps within 2 % of each other (or 0.01 mm) are one step value
# An acquired slice is "on" a grid position within max(0.1 mm, 5 % of the grid step): scanners
# round positions and tilted stacks accumulate it; farther off, the position is resampled.
_ON_GRID_MM, _ON_GRID_FRACTION = 0.1, 0.05
MAX_SLICES = 2000  # a grid with more slices than this is a mistaken --slice-spacing, not a scan


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
    invert_sum: float | None = None  # MONOCHROME1: stored value v reads as invert_sum - v (highdicom's rule)


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


def read_dicom(path: Path, series_uid: str | None = None, slice_spacing: float | None = None) -> Volume:
    """Load one series from a folder (or one enhanced multi-frame file).

    ``slice_spacing`` (mm along the slice normal) sets the grid step instead of the most common step.
    """
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
    return _assemble(headers, slice_spacing)


def _inversion(ds: pydicom.Dataset) -> float | None:
    """``lo + hi`` of the stored range when the pixels are to be inverted, else None.

    As highdicom's presentation LUT step: invert when PresentationLUTShape is INVERSE, or it is
    absent and the image is MONOCHROME1, so that higher values are brighter (MONOCHROME2).  Not for
    Hounsfield units (CT, or RescaleType HU): the rescale defines HU whatever the display polarity,
    and inverting them would make air dense.
    """
    shape = str(ds.get("PresentationLUTShape", "")).strip().upper()
    invert = shape == "INVERSE" if shape else str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1"
    if not invert or str(ds.get("Modality", "")).upper() == "CT" or str(ds.get("RescaleType", "")).upper() == "HU":
        return None
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return float(-(2 ** (bits - 1)) + 2 ** (bits - 1) - 1)
    return float(2**bits - 1)


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
            invert_sum=_inversion(ds),
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
    invert_sum = _inversion(ds)
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
                invert_sum=invert_sum,
            )
        )
    return out


def _assemble(headers: list[pydicom.Dataset], slice_spacing: float | None = None) -> Volume:
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

    # Origins must lie on one line; its direction per mm along the normal gives the k column.
    along = (slices[-1].position - slices[0].position) / (heights[-1] - heights[0])
    line_tol = 0.01 * max(float(np.diff(heights).min()), 1.0)
    for s, h in zip(slices, heights):
        if np.linalg.norm(slices[0].position + (h - heights[0]) * along - s.position) > line_tol:
            raise MedinpaintError(f"{where}: slice origins do not lie on one line; not a regular volume")
    plan = _plan_grid(heights, slice_spacing, where)
    n_k = plan.n

    lps = np.eye(4)
    lps[:3, 0] = row_dir * first.pixel_spacing[1]  # i runs along a row (column index)
    lps[:3, 1] = col_dir * first.pixel_spacing[0]  # j runs down a column (row index)
    lps[:3, 2] = along * plan.step
    lps[:3, 3] = slices[0].position + (plan.first - heights[0]) * along
    affine = LPS_TO_RAS @ lps

    array = np.full((first.columns, first.rows, n_k), np.nan, dtype=np.float32)
    reader = _PixelReader()
    for k, i in plan.placed.items():
        array[:, :, k] = reader.values(slices[i])
    grid_of = {i: k for k, i in plan.placed.items()}
    for k, (below, above, w) in plan.resampled.items():
        a, b = (array[:, :, grid_of[i]] if i in grid_of else reader.values(slices[i], keep=True) for i in (below, above))
        array[:, :, k] = (1.0 - w) * a.astype(np.float64) + w * b.astype(np.float64)

    files: list[Path | None] = [None] * n_k
    frames: list[int | None] = [None] * n_k
    for k, i in plan.placed.items():
        files[k], frames[k] = slices[i].path, slices[i].frame
    summary = plan.summary | {
        "unused_slices": [{"file": slices[i].path.name + (f" frame {slices[i].frame + 1}" if slices[i].frame is not None else ""),
                           "offset_mm": round(float(heights[i] - plan.first), 4)} for i in plan.unused],
    }
    if summary["unused_slices"]:
        log.warning("%s: %d acquired slice(s) fit no position of the %.4g mm grid and are not used (%s); "
                    "--slice-spacing chooses another grid", where, len(plan.unused), plan.step,
                    ", ".join(u["file"] for u in summary["unused_slices"]))
    ds0 = headers[0]
    return Volume(
        array=array,
        affine=affine,
        modality=str(ds0.get("Modality", "OT")) or "OT",
        source=Source(
            path=Path(where if len(headers) > 1 else headers[0].filename),
            format="dicom",
            stored_dtype=_stored_dtype(reader.min, reader.max, reader.integral),
            series_uid=str(ds0.SeriesInstanceUID),
            slice_files=tuple(files),
            slice_frames=tuple(frames),
            description=str(ds0.get("SeriesDescription", "")),
            input_files=tuple(dict.fromkeys(s.path for s in slices)),
        ),
        placeholder_slices=plan.placeholders,
        resampled_slices=tuple(sorted(plan.resampled)),
        slice_grid=summary,
    )


class _PixelReader:
    """Decode slices to modality values (rescale, MONOCHROME1), tracking the range for the stored dtype."""

    def __init__(self) -> None:
        self.min, self.max, self.integral = np.inf, -np.inf, True
        self._files: dict[Path, np.ndarray] = {}  # multi-frame files, decoded once
        self._kept: dict[int, np.ndarray] = {}

    def values(self, s: _Slice, keep: bool = False) -> np.ndarray:
        """Slice ``s`` as float32 [i, j]; ``keep`` caches it (a resampling neighbour used twice)."""
        if id(s) in self._kept:
            return self._kept[id(s)]
        if s.frame is not None and s.path in self._files:
            pixels = self._files[s.path]
        else:
            try:
                pixels = pydicom.dcmread(s.path).pixel_array
            except Exception as exc:  # decoder errors come in many types
                raise MedinpaintError(_decode_error(s.path, exc)) from None
            if s.frame is not None:
                self._files[s.path] = pixels
        frame = pixels[s.frame] if s.frame is not None else pixels
        if frame.ndim != 2:
            raise MedinpaintError(f"{s.path}: pixel data is not a grayscale image (shape {frame.shape})")
        stored = frame.astype(np.float64)
        if s.invert_sum is not None:
            stored = s.invert_sum - stored
        values = stored * s.slope + s.intercept
        self.min, self.max = min(self.min, values.min()), max(self.max, values.max())
        self.integral = self.integral and float(s.slope).is_integer() and float(s.intercept).is_integer()
        out = values.T.astype(np.float32)
        if keep:
            self._kept[id(s)] = out
        return out


@dataclass
class _GridPlan:
    step: float  # mm along the slice normal
    first: float  # height of grid position 0 along the normal
    n: int
    placed: dict[int, int]  # grid k -> acquired slice index
    resampled: dict[int, tuple[int, int, float]]  # grid k -> (slice below, slice above, weight of the one above)
    placeholders: tuple[int, ...]
    unused: list[int]  # acquired slices neither placed nor used to resample
    summary: dict


def _step_values(steps: np.ndarray) -> list[list[float]]:
    """Group the steps between slices into step values, in order of first appearance."""
    groups: list[list[float]] = []
    for step in steps.tolist():
        for g in groups:
            if abs(step - g[0]) <= max(0.01, _SAME_STEP * g[0]):
                g.append(step)
                break
        else:
            groups.append([step])
    return groups


def _plan_grid(heights: np.ndarray, slice_spacing: float | None, where: Path) -> _GridPlan:
    """Which grid position takes which acquired slice, which are resampled, which are placeholders.

    Rule: the grid step is ``slice_spacing`` or the most common step (ties: the smaller).  The grid
    is anchored on the acquired slice that puts the most slices on grid positions (ties: the lower)
    and spans the acquired slices.  A position is *placed* when an acquired slice lies within
    max(0.1 mm, 5 % of the step); *resampled* (linearly along the normal, from the acquired slices
    just below and above) when an acquired slice lies within half a step (its grid cell), at the two
    ends of the grid, or when it is the empty position nearest (less than a step) to an acquired
    slice that would otherwise go unused; otherwise a *placeholder* to synthesize.  Acquired slices
    still unused (e.g. two in one cell) are listed in the plan and logged as a warning.
    """
    steps = np.diff(heights)
    groups = _step_values(steps)
    if slice_spacing is None:
        chosen = max(groups, key=lambda g: (len(g), -float(np.mean(g))))
        step, rule = float(np.mean(chosen)), "most common step; ties: the smaller"
    else:
        step, rule = float(slice_spacing), "--slice-spacing"
        if not math.isfinite(step) or step <= 0:
            raise MedinpaintError(f"--slice-spacing must be a positive number of mm, not {slice_spacing:g}")
    span = float(heights[-1] - heights[0])
    if span / step + 1 > MAX_SLICES:
        raise MedinpaintError(
            f"{where}: a slice spacing of {step:g} mm gives {int(span / step) + 1} slices over the series' "
            f"{span:.1f} mm, more than {MAX_SLICES}; choose a larger --slice-spacing"
        )
    tol = max(_ON_GRID_MM, _ON_GRID_FRACTION * step)

    def on_grid(anchor: float) -> int:
        offset = (heights - anchor) / step
        return int((np.abs(offset - np.round(offset)) * step <= tol).sum())

    # Candidate anchors: the first slice of each run of equal steps (the start of each acquisition part).
    starts = [0] + [i + 1 for i in range(1, len(steps)) if abs(steps[i] - steps[i - 1]) > max(0.01, _SAME_STEP * steps[i - 1])]
    anchor = heights[max(starts, key=lambda i: (on_grid(heights[i]), -i))]
    lo = math.ceil((heights[0] - anchor - tol) / step)
    hi = math.floor((heights[-1] - anchor + tol) / step)
    n = hi - lo + 1
    if n < 2:
        raise MedinpaintError(
            f"{where}: a slice spacing of {step:g} mm leaves fewer than 2 slices over the series' {span:.1f} mm"
        )
    first = anchor + lo * step
    placed: dict[int, int] = {}
    resampled: dict[int, tuple[int, int, float]] = {}
    empty: list[int] = []

    def resample(k: int) -> None:
        h = first + k * step
        above = int(np.searchsorted(heights, h))  # h lies strictly inside the acquired range (within tol of neither end)
        resampled[k] = (above - 1, above, float((h - heights[above - 1]) / (heights[above] - heights[above - 1])))

    for k in range(n):
        h = first + k * step
        above = int(np.searchsorted(heights, h))
        near = min((i for i in (above - 1, above) if 0 <= i < len(heights)), key=lambda i: abs(heights[i] - h))
        distance = abs(heights[near] - h)
        if distance <= tol:
            placed[k] = near
        elif distance < step / 2 or k in (0, n - 1):
            resample(k)
        else:
            empty.append(k)

    def unused_slices() -> list[int]:
        used = set(placed.values()) | {i for b, a, _ in resampled.values() for i in (b, a)}
        return [i for i in range(len(heights)) if i not in used]

    # An acquired slice that would go unused (its cell already taken) resamples the nearest empty
    # position less than a step away, so measured data is not dropped when a neighbour can use it.
    for i in unused_slices():
        if i in unused_slices():
            candidates = [k for k in empty if abs(first + k * step - heights[i]) < step]
            if candidates:
                k = min(candidates, key=lambda k: abs(first + k * step - heights[i]))
                empty.remove(k)
                resample(k)
    placeholders = empty
    unused = unused_slices()
    summary = {
        "steps_found": ", ".join(f"{len(g)} x {np.mean(g):.3g} mm" for g in groups),
        "steps_found_mm": [[round(float(np.mean(g)), 4), len(g)] for g in groups],
        "grid_step_mm": round(step, 6),
        "grid_rule": rule,
        "on_grid_tolerance_mm": round(tol, 4),
        "acquired_slices": len(heights),
        "on_grid": len(placed),
        "resampled": len(resampled),
        "to_synthesize": len(placeholders),
        "max_on_grid_offset_mm": round(max(abs(heights[i] - first - k * step) for k, i in placed.items()), 4) if placed else None,
        "resampling": "linear along the slice normal between the acquired slices just below and above",
    }
    return _GridPlan(step, first, n, placed, resampled, tuple(placeholders), unused, summary)


def _stored_dtype(lo: float, hi: float, integral: bool) -> str:
    if integral:
        for dtype in ("uint8", "int16", "uint16", "int32"):
            info = np.iinfo(dtype)
            if info.min <= lo and hi <= info.max:
                return dtype
    return "float32"


def _decode_error(path: Path, exc: Exception) -> str:
    """One line naming the file, its transfer syntax and why its pixels cannot be decoded."""
    reason = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__  # one line
    try:
        uid = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    except Exception:  # no readable transfer syntax: say what the reader said
        return f"{path}: cannot decode pixel data ({reason})"
    syntax = f"{uid.name} ({uid})" if uid.name != uid else uid
    try:
        available = get_decoder(uid).is_available
    except NotImplementedError:
        return f"{path}: pixel data in {syntax} is not supported (no pydicom decoder exists for it)"
    if not available:
        package = "pylibjpeg-openjpeg" if uid.startswith(("1.2.840.10008.1.2.4.9", "1.2.840.10008.1.2.4.20")) else "pylibjpeg-libjpeg"
        return f"{path}: cannot decode {syntax}: no decoder installed; pip install pylibjpeg {package}"
    return f"{path}: cannot decode {syntax} pixel data ({reason})"
