"""XCIST (GE's open CT simulator, PyPI ``gecatsim``) as a second source of metal cases.

Our own simulator (``medinpaint.metal.simulate``) cannot test or train a correction against
errors it does not make itself: a correction tuned on it made every XCIST case worse (issue 17).
XCIST scans a voxelized water/bone/metal phantom with a polychromatic spectrum, quantum and
electronic noise and a curved third-generation detector, and reconstructs with its own FBP.
It is an optional dependency of the benchmark and of training only: ``pip download --no-deps
gecatsim``, unpack the sdist and put it (with matplotlib) on PYTHONPATH; its prebuilt library
runs where pip's build of it fails.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from medinpaint.errors import MedinpaintError

XCIST_PIXEL_MM = 500.0 / 512  # XCIST reconstructs 512 x 512 over a 500 mm field


def import_xcist():
    """The gecatsim package, or a one-line error saying how to get it."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import gecatsim
            import gecatsim.reconstruction.pyfiles.recon  # noqa: F401
    except ImportError as exc:
        raise MedinpaintError(f"XCIST (gecatsim) is not importable ({exc}): pip download --no-deps gecatsim -d /tmp/gecatsim, "
                              "unpack the sdist, and put it (and matplotlib) on PYTHONPATH") from None
    return gecatsim


def phantom_fractions(hu: np.ndarray) -> dict[str, np.ndarray]:
    """Water and bone volume fractions from HU: water of density 0..1 up to 0 HU (soft tissue is water), above 100 HU a water/bone mix."""
    hu = np.nan_to_num(hu, nan=-1024.0)
    bone = np.clip((hu - 100) / 1500, 0, 1)
    water = np.where(hu > 100, 1 - bone, np.clip((hu + 1000) / 1000, 0, 1.0))
    return {"water": water.astype(np.float32), "bone": bone.astype(np.float32)}


def _supersampled_grid(n: int, supersample: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(n * supersample) + 0.5) / supersample - 0.5
    return np.meshgrid(c, c, indexing="ij")


def _disk(ii, jj, ci: float, cj: float, r_mm: float) -> np.ndarray:
    return (ii - ci) ** 2 + (jj - cj) ** 2 < (r_mm / XCIST_PIXEL_MM) ** 2


def _bar(ii, jj, ci: float, cj: float, width_mm: float, length_mm: float, degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    u, v = (ii - ci) * np.cos(a) + (jj - cj) * np.sin(a), -(ii - ci) * np.sin(a) + (jj - cj) * np.cos(a)
    return (np.abs(u) < length_mm / XCIST_PIXEL_MM / 2) & (np.abs(v) < width_mm / XCIST_PIXEL_MM / 2)


def xcist_metal(kind: str, hu: np.ndarray, supersample: int = 4) -> tuple[np.ndarray, str]:
    """Metal volume fraction (partial volume from 4x supersampling) and XCIST material for one case."""
    n = hu.shape[0]
    bi, bj = ndimage.center_of_mass(hu > -300)
    si, sj = ndimage.center_of_mass(hu > 300)
    ii, jj = _supersampled_grid(n, supersample)
    mm = 1 / XCIST_PIXEL_MM

    def disk(ci, cj, r):
        return _disk(ii, jj, ci, cj, r)

    def bar(ci, cj, width, length, degrees):
        return _bar(ii, jj, ci, cj, width, length, degrees)

    if kind == "ti_rods":  # two 6 mm titanium rods seen end-on
        mask, material = disk(bi + 20 * mm, bj - 25 * mm, 3) | disk(bi + 20 * mm, bj + 25 * mm, 3), "Ti"
    elif kind == "ti_screws":  # two 5 x 40 mm titanium pedicle-like screws in-plane, converging on the vertebra
        mask, material = bar(si - 12 * mm, sj - 12 * mm, 5, 40, 70) | bar(si - 12 * mm, sj + 12 * mm, 5, 40, 110), "Ti"
    elif kind == "steel_ball":  # a 14 mm steel ball
        mask, material = disk(bi - 30 * mm, bj - 40 * mm, 7), "Fe"
    elif kind == "wires":  # three 1.2 mm steel wires
        mask = disk(bi - 80 * mm, bj - 20 * mm, 0.6) | disk(bi - 80 * mm, bj, 0.6) | disk(bi - 80 * mm, bj + 20 * mm, 0.6)
        material = "Fe"
    elif kind == "dental":  # five 5-7 mm silver blobs on an arc, like fillings
        mask = np.zeros(ii.shape, bool)
        for degrees, r in zip((200, 235, 270, 305, 340), (2.5, 3.5, 3.0, 3.5, 2.5)):
            a = np.deg2rad(degrees)
            mask |= disk(bi + 25 * mm * np.sin(a) + 10 * mm, bj + 25 * mm * np.cos(a), r)
        material = "Ag"
    else:
        raise ValueError(kind)
    return mask.reshape(n, supersample, n, supersample).mean(axis=(1, 3)).astype(np.float32), material


def xcist_scan(xc, folder: Path, name: str, fractions: dict[str, np.ndarray], views: int, ma: float, seed: int,
                noise: bool = True) -> np.ndarray:
    """Scan one voxelized slice with XCIST (1 detector row, ``views`` over 360 degrees) and reconstruct it in HU.

    ``noise=False`` turns off XCIST's quantum and electronic noise: the metal-free truth.
    """
    import gecatsim.reconstruction.pyfiles.recon as recon

    n = next(iter(fractions.values())).shape[0]
    files = []
    for material, volume in fractions.items():
        files.append(f"{name}_{material}.raw")
        volume.astype(np.float32)[None].tofile(folder / files[-1])
    count = len(fractions)
    phantom = {"n_materials": count, "mat_name": list(fractions), "volumefractionmap_filename": files,
               "volumefractionmap_datatype": ["float"] * count, "cols": [n] * count, "rows": [n] * count, "slices": [1] * count,
               "x_size": [XCIST_PIXEL_MM] * count, "y_size": [XCIST_PIXEL_MM] * count, "z_size": [10.0] * count,
               "x_offset": [(n + 1) / 2] * count, "y_offset": [(n + 1) / 2] * count, "z_offset": [1.0] * count}
    (folder / f"{name}.json").write_text(json.dumps(phantom))
    cfg = Path(xc.__file__).parent / "examples" / "cfg"
    np.random.seed(seed)  # XCIST draws its noise from numpy's global generator
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ct = xc.CatSim(*(str(cfg / c) for c in ("Phantom_Sample", "Scanner_Sample_generic", "Protocol_Sample_axial",
                                                "Physics_Sample", "Recon_Sample_2d")))
        ct.phantom.filename, ct.phantom.scale = str(folder / f"{name}.json"), 1.0
        ct.resultsName = str(folder / name)
        ct.protocol.viewsPerRotation = ct.protocol.viewCount = views
        ct.protocol.stopViewId = views - 1
        ct.protocol.mA = ma
        ct.scanner.detectorRowsPerMod = ct.scanner.detectorRowCount = 1
        for sampling in ("colSampleCount", "rowSampleCount", "srcXSampleCount", "srcYSampleCount", "viewSampleCount"):
            setattr(ct.physics, sampling, 1)
        ct.physics.energyCount = 12
        ct.physics.enableQuantumNoise = ct.physics.enableElectronicNoise = int(noise)
        ct.recon.fov, ct.recon.imageSize, ct.recon.sliceCount, ct.recon.sliceThickness = 500.0, n, 1, 1.0
        ct.run_all()
        ct.do_Recon = 1
        recon.recon(ct)
    return np.array(xc.rawread(str(folder / f"{name}_{n}x{n}x1.raw"), [1, n, n], "float")[0], dtype=np.float32)


def random_metal(hu: np.ndarray, rng: np.random.Generator, supersample: int = 4) -> tuple[np.ndarray, str, str]:
    """(metal volume fraction, XCIST material, kind) of random metal inside the body of one slice (``XCIST_PIXEL_MM`` grid).

    Training cases, unlike the benchmark's fixed ones (``xcist_metal``): 1-3 rods, 1-2 screws at
    any angle, a ball, 2-4 thin wires or a dental-like cluster of 3-6 blobs, titanium, steel or
    silver, anywhere at least 8 mm inside the body.
    """
    n = hu.shape[0]
    body = ndimage.binary_fill_holes(hu > -300)
    inside = ndimage.distance_transform_edt(body) * XCIST_PIXEL_MM > 8
    if not inside.any():
        raise MedinpaintError("no body in this slice to put metal in")
    ii, jj = _supersampled_grid(n, supersample)
    mm = 1 / XCIST_PIXEL_MM
    candidates = np.argwhere(inside)

    def place() -> tuple[float, float]:
        return tuple(float(x) for x in candidates[rng.integers(len(candidates))])

    def disk(ci, cj, r):
        return _disk(ii, jj, ci, cj, r)

    def bar(ci, cj, width, length, degrees):
        return _bar(ii, jj, ci, cj, width, length, degrees)

    kind = str(rng.choice(["rods", "screws", "ball", "wires", "dental"]))
    ci, cj = place()
    if kind == "rods":
        material = str(rng.choice(["Ti", "Ti", "Fe"]))
        mask = disk(ci, cj, rng.uniform(1.5, 5))
        for _ in range(int(rng.integers(0, 3))):
            mask |= disk(*place(), rng.uniform(1.5, 5))
    elif kind == "screws":
        material = "Ti"
        mask = bar(ci, cj, rng.uniform(4, 6), rng.uniform(20, 45), rng.uniform(0, 180))
        if rng.random() < 0.5:
            mask |= bar(ci, cj + rng.uniform(15, 30) * mm, rng.uniform(4, 6), rng.uniform(20, 45), rng.uniform(0, 180))
    elif kind == "ball":
        material = str(rng.choice(["Fe", "Ti"]))
        mask = disk(ci, cj, rng.uniform(3, 8))
    elif kind == "wires":
        material = "Fe"
        a, step = rng.uniform(0, np.pi), rng.uniform(8, 25) * mm
        mask = np.zeros(ii.shape, bool)
        for m in range(int(rng.integers(2, 5))):
            mask |= disk(ci + m * step * np.sin(a), cj + m * step * np.cos(a), rng.uniform(0.5, 0.8))
    else:
        material = str(rng.choice(["Ag", "Fe"]))
        radius, start = rng.uniform(18, 30) * mm, rng.uniform(0, 360)
        mask = np.zeros(ii.shape, bool)
        for m in range(int(rng.integers(3, 7))):
            a = np.deg2rad(start + 35 * m)
            mask |= disk(ci + radius * np.sin(a), cj + radius * np.cos(a), rng.uniform(2, 3.5))
    fraction = mask.reshape(n, supersample, n, supersample).mean(axis=(1, 3)) * body
    return fraction.astype(np.float32), material, kind


def xcist_volume(array: np.ndarray):
    """A CT Volume (i, j, k) on the XCIST grid: ``XCIST_PIXEL_MM`` pixels, slices 1 mm apart."""
    from medinpaint.data.volume import Volume

    return Volume(array.astype(np.float32), np.diag([XCIST_PIXEL_MM, XCIST_PIXEL_MM, 1.0, 1.0]), modality="CT")


def on_xcist_grid(hu: np.ndarray, pixel_mm: tuple[float, float], n: int = 512) -> np.ndarray:
    """One slice (HU) resampled to ``XCIST_PIXEL_MM`` pixels and centred in an ``n`` x ``n`` field of air (cropped if larger)."""
    hu = np.nan_to_num(hu.astype(np.float32), nan=-1024.0)
    zoom = [p / XCIST_PIXEL_MM for p in pixel_mm]
    if any(abs(z - 1) > 1e-3 for z in zoom):
        hu = ndimage.zoom(hu, zoom, order=1)
    out = np.full((n, n), -1024.0, dtype=np.float32)
    src = [slice(max(0, (s - n) // 2), max(0, (s - n) // 2) + min(s, n)) for s in hu.shape]
    dst = [slice(max(0, (n - s) // 2), max(0, (n - s) // 2) + min(s, n)) for s in hu.shape]
    out[dst[0], dst[1]] = hu[src[0], src[1]]
    return out


def make_xcist_pairs(slices: list[tuple[str, np.ndarray]], per_slice: int, out_dir: Path, seed: int, views: int = 500,
                     currents: tuple[float, ...] = (100.0, 200.0, 400.0, 800.0)) -> list[Path]:
    """Training cases from XCIST: for each (name, slice on the XCIST grid) a noise-free metal-free truth and ``per_slice``
    scans with random metal (``random_metal``) at a random tube current; written as ``<name>-<m>.npz`` with damaged,
    truth, metal, material, kind and mA, skipping files already there (an interrupted run resumes)."""
    xc = import_xcist()
    work = out_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, (name, hu) in enumerate(slices):
        truth = None
        for m in range(per_slice):
            path = out_dir / f"{name}-{m}.npz"
            paths.append(path)
            if path.exists():
                continue
            if truth is None:
                truth = xcist_scan(xc, work, f"truth-{name}", phantom_fractions(hu), views, 800.0, seed=0, noise=False)
            rng = np.random.default_rng([seed, s, m])
            metal, material, kind = random_metal(hu, rng)
            ma = float(rng.choice(currents))
            with_metal = {k: f * (1 - metal) for k, f in phantom_fractions(hu).items()} | {material: metal}
            damaged = xcist_scan(xc, work, f"{name}-{m}", with_metal, views, ma, seed=int(rng.integers(2**31)))
            tmp = path.with_suffix(".tmp.npz")
            np.savez_compressed(tmp, damaged=damaged, truth=truth, metal=metal, material=material, kind=kind, mA=ma)
            tmp.replace(path)
    return paths


# Training sources: every real CT of the shared data except ct_abdomen_dicom, which the benchmark's cases come from.
# (file, first slice, last slice): the 3 mm abdomen's first 20 slices hold a dense object of their own
TRAINING_SCANS = (("ct_head_ge_variable_spacing", 3, 34), ("ct_abdomen_3mm.nii.gz", 20, 110))


def training_slices(data_dir: Path, per_scan: int) -> list[tuple[str, np.ndarray]]:
    """``per_scan`` evenly spaced acquired slices (not the NaN gaps of a variable-spacing series) of each of ``TRAINING_SCANS``, on the XCIST grid, named by scan and slice."""
    from medinpaint.data.load import load

    out = []
    for name, first, last in TRAINING_SCANS:
        volume = load(data_dir / name, modality="CT")
        acquired = [k for k in range(first, min(last, volume.shape[2] - 1) + 1) if not np.isnan(volume.array[:, :, k]).all()]
        for k in np.asarray(acquired)[np.linspace(0, len(acquired) - 1, per_scan).round().astype(int)]:
            out.append((f"{name.split('.')[0]}-{k}", on_xcist_grid(volume.array[:, :, k], tuple(volume.spacing[:2]))))
    return out


def main() -> None:
    import argparse
    import os

    parser = argparse.ArgumentParser(description="Make XCIST metal training cases (needs gecatsim on PYTHONPATH).")
    parser.add_argument("out", type=Path, help="folder for the cases (an interrupted run resumes)")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2].parent / "shared" / "data")
    parser.add_argument("--per-scan", type=int, default=12, help="slices per training scan")
    parser.add_argument("--per-slice", type=int, default=2, help="metal cases per slice")
    parser.add_argument("--seed", type=int, default=17)
    args = parser.parse_args()
    os.environ.setdefault("MPLBACKEND", "Agg")  # XCIST imports pyplot
    try:
        paths = make_xcist_pairs(training_slices(args.data, args.per_scan), args.per_slice, args.out, args.seed)
    except MedinpaintError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"{len(paths)} XCIST cases in {args.out}")


if __name__ == "__main__":
    main()
