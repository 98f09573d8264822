"""Before / after / difference pictures of the default metal correction, for the README and the model card.

Two panels, each written as a PNG (grey levels in a soft-tissue window, differences in +-200 HU):

* the real hip implant of ``sample_data/ct_abdomen_3mm.nii.gz`` (no truth exists): acquired,
  corrected, corrected - acquired, on the metal slice with the most corrected voxels;
* one XCIST case from the cache of ``benchmarks/metal.py --xcist DIR``: truth (no metal, no
  noise), acquired, corrected, corrected - acquired, and the errors of both against the truth
  (low-passed like the benchmark's "streaks" scores, so the scan's pixel noise does not hide them);
* the same for one case with random metal in another real CT (``--xcist-random FILE``).

    python benchmarks/metal_figure.py --xcist DIR [--case steel_ball-200mA] [--xcist-random FILE] [--out docs/images]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

import medinpaint
from medinpaint.artifacts.find import find_artifacts
from medinpaint.artifacts.labels import ArtifactKind
from medinpaint.config import Settings
from medinpaint.training.xcist import xcist_volume
from metal import STREAK_SIGMA_PX, XCIST_CASES, xcist_case  # benchmarks/metal.py: one copy of the cases and the score's low-pass

REPO = Path(__file__).resolve().parent.parent
WINDOW = (-200.0, 400.0)  # soft tissue and bone edges; streaks stand out
DIFF_HU = 200.0


def grey(image: np.ndarray, lo: float = WINDOW[0], hi: float = WINDOW[1]) -> Image.Image:
    scaled = np.clip((np.nan_to_num(image, nan=lo) - lo) / (hi - lo), 0, 1) * 255
    return Image.fromarray(scaled.astype(np.uint8)).convert("RGB")


def diverging(diff: np.ndarray, metal: np.ndarray) -> Image.Image:
    """Blue below zero, red above, white at zero; the metal grey (kept, not corrected)."""
    t = np.clip(np.nan_to_num(diff) / DIFF_HU, -1, 1)
    rgb = np.ones(diff.shape + (3,))
    rgb[..., 0] -= np.clip(-t, 0, 1)
    rgb[..., 1] -= np.abs(t)
    rgb[..., 2] -= np.clip(t, 0, 1)
    rgb[metal] = 0.5
    return Image.fromarray((rgb * 255).astype(np.uint8))


def montage(tiles: list[tuple[str, Image.Image]], columns: int, path: Path, size: int = 320) -> None:
    rows = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (columns * size, rows * (size + 18)), "white")
    draw = ImageDraw.Draw(sheet)
    for n, (title, tile) in enumerate(tiles):
        x, y = (n % columns) * size, (n // columns) * (size + 18)
        sheet.paste(tile.resize((size, size), Image.Resampling.LANCZOS), (x, y + 18))
        draw.text((x + 4, y + 3), title, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, optimize=True)
    print(f"wrote {path} ({path.stat().st_size // 1024} KB)")


def crop_square(*images: np.ndarray, around: np.ndarray, half: int) -> list[np.ndarray]:
    ci, cj = (int(np.mean(ix)) for ix in np.nonzero(around))
    i0 = int(np.clip(ci - half, 0, around.shape[0] - 2 * half))
    j0 = int(np.clip(cj - half, 0, around.shape[1] - 2 * half))
    return [x[i0 : i0 + 2 * half, j0 : j0 + 2 * half] for x in images]


def hip(out: Path) -> None:
    volume = medinpaint.load(REPO / "sample_data" / "ct_abdomen_3mm.nii.gz")
    found = find_artifacts(volume, artifacts="metal")
    corrected = medinpaint.correct(volume, found, settings=Settings()).volume.array
    streaks = found.labels == ArtifactKind.METAL_STREAK
    k = int(np.argmax(streaks.sum(axis=(0, 1))))
    metal = found.labels[:, :, k] == ArtifactKind.METAL
    before, after = volume.array[:, :, k], corrected[:, :, k]
    before, after, metal_c = crop_square(before, after, metal, around=metal, half=min(128, min(before.shape) // 2))
    tiles = [("acquired", grey(before.T)), ("corrected (default)", grey(after.T)),
             ("corrected - acquired (+-200 HU)", diverging((after - before).T, metal_c.T))]
    montage(tiles, 3, out / "metal_hip_sample.png")


def low(diff: np.ndarray) -> np.ndarray:
    """The error without the pixel noise (as the benchmark's "streaks" scores): what the streaks leave."""
    return ndimage.gaussian_filter(diff, STREAK_SIGMA_PX)


def xcist(cache: Path, case: str, out: Path) -> None:
    kind, current = case.rsplit("-", 1)
    k = dict(XCIST_CASES)[kind]
    clean = medinpaint.load(REPO.parent / "shared" / "data" / "ct_abdomen_dicom")
    saved = xcist_case(clean, kind, k, views=500, ma=float(current.removesuffix("mA")), cache=cache)  # as benchmarks/metal.py made it
    truth_panel(saved["truth"], clean.slab(k, k + 1).with_array(saved["damaged"][:, :, None]), out / f"metal_xcist_{case}.png")


def xcist_random(path: Path, out: Path) -> None:
    """A case of ``python -m medinpaint.training.xcist DIR`` (random metal in another real CT)."""
    with np.load(path) as saved:
        truth, damaged = saved["truth"], xcist_volume(saved["damaged"][:, :, None].astype(np.float32))
    truth_panel(truth, damaged, out / f"metal_xcist_{path.stem}.png")


def truth_panel(truth: np.ndarray, damaged, path: Path) -> None:
    """Truth, acquired, corrected; the change; both errors against the truth, low-passed."""
    found = find_artifacts(damaged, artifacts="metal")
    after = medinpaint.correct(damaged, found, settings=Settings()).volume.array[:, :, 0]
    before, metal = damaged.array[:, :, 0], found.labels[:, :, 0] == ArtifactKind.METAL
    tiles = [("truth (XCIST, no metal, no noise)", grey(truth)), ("acquired (XCIST with metal)", grey(before)),
             ("corrected (default)", grey(after)), ("corrected - acquired (+-200 HU)", diverging(after - before, metal)),
             ("acquired - truth (low-pass 1.5 px)", diverging(low(before - truth), metal)),
             ("corrected - truth (low-pass 1.5 px)", diverging(low(after - truth), metal))]
    montage(tiles, 3, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--xcist", type=Path, help="the XCIST case cache of benchmarks/metal.py (skip the XCIST panel when absent)")
    parser.add_argument("--case", default="steel_ball-200mA")
    parser.add_argument("--xcist-random", type=Path, metavar="FILE", help="also a panel of one case made by python -m medinpaint.training.xcist")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images")
    args = parser.parse_args()
    hip(args.out)
    if args.xcist:
        xcist(args.xcist, args.case, args.out)
    if args.xcist_random:
        xcist_random(args.xcist_random, args.out)


if __name__ == "__main__":
    main()
