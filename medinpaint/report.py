"""Visual QA: per case a PNG (axial, coronal, sagittal: before, after, synthesized overlay) and an HTML index."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from medinpaint.correct import Correction
from medinpaint.data.atomic import StagedOutputs

PANEL = 256


def _window(values: np.ndarray, modality: str, reference: np.ndarray) -> np.ndarray:
    if modality == "CT":
        lo, hi = -160.0, 240.0  # soft-tissue window (W 400, L 40)
    else:
        finite = reference[np.isfinite(reference)]
        lo, hi = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
    return (np.clip((np.nan_to_num(values, nan=lo) - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)


def _view(volume: np.ndarray, axis: int, index: int, spacing: np.ndarray) -> tuple[np.ndarray, float]:
    """A 2D cut (rows = the later remaining axis, flipped so superior/anterior is up) and its physical height/width."""
    cut = np.take(volume, index, axis=axis)
    across, down = [a for a in range(3) if a != axis]
    image = np.flipud(cut.T)
    return image, (spacing[down] * cut.shape[1]) / (spacing[across] * cut.shape[0])


def _panel(gray: np.ndarray, height_over_width: float, overlay: np.ndarray | None = None) -> Image.Image:
    rgb = np.stack([gray] * 3, axis=-1)
    if overlay is not None:
        red = overlay > 0
        rgb[red] = (0.45 * rgb[red] + 0.55 * np.array([255, 40, 40])).astype(np.uint8)
    image = Image.fromarray(rgb)
    w = PANEL
    h = int(np.clip(PANEL * height_over_width, 32, 2 * PANEL))
    return image.resize((w, h), Image.BILINEAR)


def _busiest_cut(mask: np.ndarray, axis: int) -> int:
    """The cut along ``axis`` with the most synthesized voxels; among ties, the one nearest the middle."""
    counts = mask.sum(axis=tuple(a for a in range(3) if a != axis))
    middle = mask.shape[axis] // 2
    if not counts.any():
        return middle
    best = np.flatnonzero(counts == counts.max())
    return int(best[np.argmin(np.abs(best - middle))])


def write_case_png(correction: Correction, path: Path) -> Path:
    """Three rows (axial, coronal, sagittal) through the centre of the synthesized region."""
    before, after = correction.original.array, correction.volume.array
    mask = correction.synthesized > 0
    spacing = correction.volume.spacing
    centre = [_busiest_cut(mask, axis) for axis in range(3)]
    rows = []
    for axis in (2, 1, 0):  # k (axial for axial series), then j, then i
        b, height_over_width = _view(before, axis, centre[axis], spacing)
        a, _ = _view(after, axis, centre[axis], spacing)
        m, _ = _view(mask.astype(np.uint8), axis, centre[axis], spacing)
        gray_b = _window(b, correction.volume.modality, before)
        gray_a = _window(a, correction.volume.modality, before)
        rows.append([_panel(gray_b, height_over_width), _panel(gray_a, height_over_width),
                     _panel(gray_a, height_over_width, m)])
    height = sum(r[0].height for r in rows) + 24
    sheet = Image.new("RGB", (3 * PANEL, height), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    for x, title in enumerate(("before", "after", "after + synthesized (red)")):
        draw.text((x * PANEL + 6, 6), title, fill=(255, 255, 255))
    y = 24
    for row in rows:
        for x, panel in enumerate(row):
            sheet.paste(panel, (x * PANEL, y))
        y += row[0].height
    path.parent.mkdir(parents=True, exist_ok=True)
    with StagedOutputs(overwrite=True) as staged:
        sheet.save(staged.path_for(path), format="PNG")
    return path


def write_index(results: list, out_dir: Path) -> Path:
    """report/index.html: one row per case with its status, numbers and QA picture."""
    rows = []
    for r in results:
        png = out_dir / "report" / f"{r.case}.png"
        picture = f'<img src="{html.escape(png.name)}" width="480">' if png.exists() else ""
        rows.append(
            f"<tr><td>{html.escape(r.case)}</td><td>{r.status}</td><td>{html.escape(r.artifacts)}</td>"
            f"<td>{r.synthesized_fraction:.4%}</td><td>{r.seconds:.1f}</td><td>{html.escape(r.reason)}</td><td>{picture}</td></tr>"
        )
    page = (
        "<!doctype html><meta charset='utf-8'><title>medinpaint batch report</title>"
        "<style>body{font-family:sans-serif}td{border-bottom:1px solid #ccc;padding:4px;vertical-align:top}</style>"
        "<h1>medinpaint batch report</h1><p>Red: synthesized voxels (not measured).</p>"
        "<table><tr><th>case</th><th>status</th><th>artifacts</th><th>synthesized</th><th>seconds</th><th>reason</th><th>QA</th></tr>"
        + "".join(rows) + "</table>"
    )
    path = out_dir / "report" / "index.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    with StagedOutputs(overwrite=True) as staged:
        staged.path_for(path).write_text(page)
    return path
