"""The report's pictures: before / after / synthesized-overlay cuts in three planes, as PNG data URIs.

Arrays are reoriented to RAS (nearest axes of the affine) so every case is shown the same way,
and each cut is resampled with the voxel spacing so coronal and sagittal planes keep their
physical proportions.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from PIL import Image

from medinpaint.artifacts.labels import LABEL_NAMES, ArtifactKind

PANEL_PX = 320  # the largest physical extent of a case maps to this many pixels
PLANES = {2: "axial", 1: "coronal", 0: "sagittal"}  # cut across S, A and R (RAS axes)

# One colour per kind (by label name, so kinds added later get the fallback), so a curator can tell a filled
# slice from a filled streak at a glance. Metal is kept as acquired; it is drawn so the streak fill can be judged.
KIND_COLOURS = {
    "missing_slice": (230, 57, 70),
    "blank_slice": (255, 140, 0),
    "corrupt_slice": (214, 51, 214),
    "user_mask": (66, 133, 244),
    "invalid_voxel": (240, 220, 40),
    "metal_streak": (46, 204, 113),
    "metal": (0, 220, 235),
    "resampled_slice": (150, 120, 255),
}
OTHER_COLOUR = (255, 105, 180)


def colour_of(label: int) -> tuple[int, int, int]:
    return KIND_COLOURS.get(LABEL_NAMES.get(int(label), ""), OTHER_COLOUR)


@dataclass(frozen=True)
class Window:
    name: str
    lo: float
    hi: float
    focus: tuple[int, ...] = ()  # labels, in preference, whose voxels choose the cuts (the first present); () = all synthesized


@dataclass
class Cut:
    """One plane of one window: the three pictures and where they cut."""

    plane: str
    window: Window
    voxel_axis: str  # i, j or k: the volume's own axis this plane cuts across
    index: int  # the slice along that axis, in the volume's own indexing
    before: str  # data URIs
    after: str
    overlay: str
    width: int  # displayed size (CSS pixels); the PNG may hold fewer and is enlarged by the browser
    height: int


def windows(modality: str, before: np.ndarray, has_metal: bool) -> list[Window]:
    """CT: soft tissue (W 400 / L 40), plus bone (W 2000 / L 500) around metal. Others: 0.5-99.5 percentiles."""
    if modality == "CT":
        shown = [Window("soft tissue (-160..240 HU)", -160.0, 240.0)]
        if has_metal:
            shown.append(Window("bone (-500..1500 HU), cut through the metal", -500.0, 1500.0,
                                (ArtifactKind.METAL, ArtifactKind.METAL_STREAK)))
        return shown
    sample = before[::2, ::2, ::2]
    sample = sample[np.isfinite(sample)]
    lo, hi = (np.percentile(sample, [0.5, 99.5]) if sample.size else (0.0, 1.0))
    if hi <= lo:
        hi = lo + 1.0
    return [Window(f"percentiles 0.5-99.5 ({lo:.4g}..{hi:.4g})", float(lo), float(hi))]


def busiest_cut(mask: np.ndarray, axis: int) -> int:
    """The cut along ``axis`` holding the most voxels of ``mask``; among ties (whole slices), the one nearest the middle.

    Counting beats weighting by |after - before|: across whole filled slices every cut ties on the count,
    and the change would pick the brightest (often fattest) edge of the body rather than the centre.
    """
    counts = np.count_nonzero(mask, axis=tuple(a for a in range(3) if a != axis))
    middle = mask.shape[axis] // 2
    if not counts.any():
        return middle
    best = np.flatnonzero(counts == counts.max())
    return int(best[np.argmin(np.abs(best - middle))])


def cuts(before: np.ndarray, after: np.ndarray, labels: np.ndarray, synthesized: np.ndarray, affine: np.ndarray,
         shown: list[Window]) -> list[Cut]:
    """Per window, the axial, coronal and sagittal cuts through the most synthesized voxels (or those of its focus)."""
    ornt = nib.orientations.io_orientation(affine)
    ras = [nib.orientations.apply_orientation(a, ornt) for a in (before, after, labels, synthesized)]
    b, a, lab, syn = ras
    spacing = np.empty(3)
    spacing[ornt[:, 0].astype(int)] = np.linalg.norm(affine[:3, :3], axis=0)
    extent = np.array(b.shape) * spacing
    scale = PANEL_PX / extent.max()  # displayed pixels per mm, shared by the three planes
    stored = min(1.0 / spacing.min(), 2 * scale)  # PNG pixels per mm: no finer than the scan, the browser enlarges
    found = []
    for window in shown:
        focus = syn
        for label in window.focus:
            if (lab == label).any():
                focus = lab == label
                break
        for axis, plane in PLANES.items():
            index = busiest_cut(focus, axis)
            source_axis = int(np.flatnonzero(ornt[:, 0] == axis)[0])
            source_index = index if ornt[source_axis, 1] > 0 else b.shape[axis] - 1 - index
            across, down = [d for d in range(3) if d != axis]
            size = (max(1, round(extent[across] * scale)), max(1, round(extent[down] * scale)))
            png_size = (max(1, round(extent[across] * stored)), max(1, round(extent[down] * stored)))
            gray_b, gray_a = (_display(_cut(v, axis, index)) for v in (b, a))
            lab_cut, syn_cut = _cut(lab, axis, index), _cut(syn, axis, index)
            mask_cut = _display(np.where(syn_cut | (lab_cut == ArtifactKind.METAL), lab_cut, 0))
            pictures = [_png(_rgb(g, window), png_size) for g in (gray_b, gray_a)]
            pictures.append(_png(_rgb(gray_a, window), png_size, mask_cut))
            found.append(Cut(plane, window, "ijk"[source_axis], source_index, *pictures, *size))
    return found


def _cut(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    """One plane, by basic indexing: a view (np.take would copy the whole reoriented volume first)."""
    return np.asarray(volume[(slice(None),) * axis + (index,)])


def _display(cut: np.ndarray) -> np.ndarray:
    """RAS cut -> rows top to bottom: superior (or anterior) up, patient's right on the left (radiological)."""
    return np.flipud(np.flipud(cut).T)  # flip the across axis (R on the left), then rows from the top


def _rgb(values: np.ndarray, window: Window) -> np.ndarray:
    clean = np.nan_to_num(values.astype(np.float32), nan=window.lo, posinf=window.hi, neginf=window.lo)
    gray = (np.clip((clean - window.lo) / (window.hi - window.lo), 0, 1) * 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)


def _png(rgb: np.ndarray, size: tuple[int, int], labels: np.ndarray | None = None) -> str:
    image = Image.fromarray(rgb).resize(size, Image.BILINEAR)
    if labels is not None and labels.any():
        lab = np.asarray(Image.fromarray(labels.astype(np.uint8)).resize(size, Image.NEAREST))
        pixels = np.asarray(image).astype(np.float32)
        for label in np.unique(lab[lab > 0]):
            hit = lab == label
            pixels[hit] = 0.45 * pixels[hit] + 0.55 * np.array(colour_of(label), np.float32)
        image = Image.fromarray(pixels.astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
