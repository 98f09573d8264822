"""Metal-artifact correction scored against a metal-free truth: our own simulator and XCIST.

Two sources of cases, both from `ct_abdomen_dicom` (512 x 512, 0.98 mm; no model saw it):

* own simulator (default): metal inserted and the slices re-scanned by
  `medinpaint.simulate.simulate_metal_volume`, with its metal-free reference.  metal-v3 was trained
  on pairs from this simulator, so it is not an independent test.
* `--xcist DIR`: cases made by XCIST (`gecatsim`, GE's open CT simulator behind the AAPM CT-MAR
  challenge; we did not write it and the shipped model never saw it).  One slice per case is turned
  into a voxelized water/bone phantom, metal is added (titanium rods, titanium screws, a steel ball,
  thin steel wires, a silver dental-like cluster), and XCIST scans it with and without the metal
  (polychromatic 120 kVp, quantum and electronic noise, a third-generation curved detector,
  its own FDK reconstruction) at two tube currents (noise levels), and once more without metal and
  without noise: the truth scored against.  The cases are cached in DIR.
  XCIST is a benchmark-only dependency: `pip download --no-deps gecatsim`, unpack the sdist and put
  it on PYTHONPATH (with matplotlib, which it imports); its prebuilt library runs where pip's build
  of it fails.

Scores: PSNR, SSIM and RMSE (HU) in the body, metal (true or detected, grown by a pixel) excluded,
on the slices holding metal; and the same after a Gaussian low-pass of both images (sigma 1.5 px,
"streaks"), which measures the artifact without the pixel noise (see ``score``).  Columns:
  uncorrected   the damaged scan
  LI, NMAR      the whole slice replaced by the literature's correction (the metal's trace alone)
  change_only   image + FBP(NMAR sinogram - sinogram of the image), metal halo re-filled, written in
                the region where that change is significant, every slice corrected (metal.gate: off)
  default       what `medinpaint correct` writes with the shipped settings, or those of --config FILE (change-only, gated)
  network       the change-only fill refined by the metal model (metal.refine: network), gated
  gate          per slice: the streak evidence and the decision
  per_slice     per slice: [slice, streak evidence, streaks gain of change_only over uncorrected in dB], the
                data the gate threshold is chosen from (printed at the end, sorted by evidence)

    python benchmarks/metal.py [--configs 4] [--views 720] [--photons 2e5] [--cache DIR] [--model NAME_OR_PATH] [--config FILE]
    python benchmarks/metal.py --other-scans 42 [--cache DIR] --no-network   (random metal in every real CT of --data)
    PYTHONPATH=/tmp/gecatsim/gecatsim-1.6.9 python benchmarks/metal.py --xcist DIR [--xcist-views 500] [--ma 200,800]
    python benchmarks/metal.py --xcist-random DIR --no-network   (cases of `python -m medinpaint.training.xcist DIR`)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from skimage.metrics import structural_similarity

import medinpaint
from medinpaint.artifacts.find import find_artifacts
from medinpaint.artifacts.labels import ArtifactKind
from medinpaint.artifacts.metal import MetalDetection
from medinpaint.artifacts.metal_correction import geometry_for
from medinpaint.config import Settings, load_settings
from medinpaint.errors import MedinpaintError
from medinpaint.inpaint.models import DEFAULT_METAL_MODEL, MODELS_DIR
from medinpaint.metal.mar import li_mar, nmar
from medinpaint.metrics import metal_scored_region
from medinpaint.simulate import simulate_metal_volume
from medinpaint.training.xcist import import_xcist, phantom_fractions, xcist_metal, xcist_scan, xcist_volume

REPO = Path(__file__).resolve().parent.parent
CONFIGS = [("ball", 0), ("screw", 2), ("irregular", 3), ("ball", 4), ("rod", 1), ("screw", 6), ("irregular", 7), ("rod", 5)]
XCIST_CASES = [("ti_rods", 4), ("ti_screws", 8), ("steel_ball", 12), ("wires", 16), ("dental", 10)]  # (metal, slice of ct_abdomen_dicom)
STREAK_SIGMA_PX = 1.5  # low-pass of the "streaks" scores


def _metrics(reference: np.ndarray, image: np.ndarray, region: np.ndarray) -> dict:
    err = image[region].astype(np.float64) - reference[region]
    rng = float(reference[region].max() - reference[region].min())
    ssim = []
    for k in np.flatnonzero(region.any(axis=(0, 1))):
        _, smap = structural_similarity(reference[:, :, k].astype(np.float64), image[:, :, k].astype(np.float64),
                                        data_range=rng, win_size=7, full=True)
        ssim.append(smap[region[:, :, k]])
    mse = float(np.mean(err**2))
    return {"psnr_db": round(10 * np.log10(rng**2 / mse), 2), "ssim": round(float(np.mean(np.concatenate(ssim))), 4),
            "rmse_hu": round(float(np.sqrt(mse)), 1)}


def low_pass(image: np.ndarray) -> np.ndarray:
    """In-plane Gaussian low-pass (sigma STREAK_SIGMA_PX) of a volume: the streaks kept, most pixel noise dropped."""
    return ndimage.gaussian_filter(np.nan_to_num(image.astype(np.float64)), (STREAK_SIGMA_PX, STREAK_SIGMA_PX, 0))


def streak_view(reference: np.ndarray, image: np.ndarray, region: np.ndarray) -> np.ndarray:
    """``low_pass`` of ``image`` with the reference's values outside the scored ``region``.

    Outside the region lie the metal and its edge, which every method keeps as acquired (thousands
    of HU): low-passed with the image, they would leak into the scored voxels beside them, the same
    in every column, and hide what a method does there (the skull-base wires of the random XCIST
    cases lost 5.8 dB that way and lose 11.6 dB without the leak; before 2026-12-08 the benchmark
    low-passed the image as it was).
    """
    return low_pass(np.where(region, image, reference))


def score(reference: np.ndarray, image: np.ndarray, region: np.ndarray) -> dict:
    """PSNR (data range of the reference in the region), SSIM (7 px windows, per slice) and RMSE in HU; and the same
    after an in-plane Gaussian low-pass of both images (``streaks``, sigma STREAK_SIGMA_PX; ``streak_view``).

    The plain scores also count the scan's own pixel noise, so any blur (a full re-projection round
    trip of the *uncorrected* scan gains 1.2-1.8 dB on the 200 mA XCIST cases) scores as a gain.
    The low-pass scores keep the streaks (coherent over many pixels) and drop most pixel noise, so
    they measure artifact removal without rewarding or punishing the noise a method leaves.
    """
    out = _metrics(reference, image, region)
    out["streaks"] = _metrics(low_pass(reference), streak_view(reference, image, region), region)
    return out


def literature(volume, metal: np.ndarray, ks: list[int], method: str) -> np.ndarray:
    """Every slice in ``ks`` replaced by LI or NMAR as published (the metal's trace alone, whole slice)."""
    geometry = geometry_for(volume, MetalDetection())
    out = volume.array.copy()
    correct = li_mar if method == "li" else nmar
    for k in ks:
        image = torch.from_numpy(np.nan_to_num(volume.array[:, :, k], nan=-1024.0).astype(np.float32))
        out[:, :, k] = correct(image, torch.from_numpy(metal[:, :, k]), geometry).numpy()
    return out


def gain_per_slice(reference: np.ndarray, acquired: np.ndarray, corrected: np.ndarray, region: np.ndarray, gate: dict) -> list:
    """Per slice with metal: its streak evidence and what correcting it gains over keeping it (streaks PSNR, dB).

    The data the gate threshold is chosen from: ``10 log10(MSE kept / MSE corrected)`` of the
    low-passed images in the slice's scored region (the data range cancels).
    """
    out = []
    for k, decision in sorted(gate.items()):
        m = region[:, :, k]
        if not m.any():
            continue
        ref = low_pass(reference[:, :, k : k + 1])[:, :, 0]
        kept, fixed = (streak_view(reference[:, :, k : k + 1], x[:, :, k : k + 1], region[:, :, k : k + 1])[:, :, 0]
                       for x in (acquired, corrected))
        mse_kept, mse_fixed = (float(np.mean((x[m] - ref[m]) ** 2)) for x in (kept, fixed))
        out.append([int(k), decision["streak_evidence"], round(10 * np.log10(max(mse_kept, 1e-12) / max(mse_fixed, 1e-12)), 2)])
    return out


def score_case(damaged, reference: np.ndarray, true_metal: np.ndarray, network: bool, model: str | None,
               default: Settings) -> dict:
    """Every column for one case (damaged: a Volume; reference and true_metal on its grid); ``default`` is what
    `medinpaint correct` would use (the shipped settings, or a ``--config`` file's)."""
    found = find_artifacts(damaged, artifacts="metal", metal_settings=default.metal)
    detected = found.labels == ArtifactKind.METAL
    ks = sorted(set(np.flatnonzero((true_metal | detected).any(axis=(0, 1))).tolist()))
    region = np.zeros(damaged.shape, bool)
    region[:, :, ks] = metal_scored_region(reference, true_metal | detected)[:, :, ks]
    forced = Settings(metal=dataclasses.replace(default.metal, gate="off"))
    found_forced = find_artifacts(damaged, artifacts="metal", metal_settings=forced.metal)
    det_ks = sorted(found_forced.metal_gate)
    row = {
        "uncorrected": score(reference, damaged.array, region),
        "LI": score(reference, literature(damaged, detected, det_ks, "li"), region),
        "NMAR": score(reference, literature(damaged, detected, det_ks, "nmar"), region),
    }
    change_only = medinpaint.correct(damaged, found_forced, method="classical", settings=forced).volume.array
    row["change_only"] = score(reference, change_only, region)
    t = time.perf_counter()
    row["default"] = score(reference, medinpaint.correct(damaged, found, settings=default).volume.array, region)
    row["default_seconds"] = round(time.perf_counter() - t, 1)
    if network and (found.labels == ArtifactKind.METAL_STREAK).any():
        refined = Settings(metal=dataclasses.replace(default.metal, refine="network"))
        row["network"] = score(reference, medinpaint.correct(damaged, found, settings=refined, metal_model=model).volume.array, region)
    elif network:
        row["network"] = row["default"]  # every slice gated out: the network is not run, the scan is kept
    row["gate"] = {k: (v["decision"].split(",")[0], v["streak_evidence"], v["noise_hu"]) for k, v in found.metal_gate.items()}
    row["per_slice"] = gain_per_slice(reference, damaged.array, change_only, region, found_forced.metal_gate)
    row["streak_fraction_of_body"] = round(float((found.labels == ArtifactKind.METAL_STREAK)[region].mean()), 3)
    return row


def scored_row(case: dict, damaged, reference: np.ndarray, true_metal: np.ndarray, started: float, args, network: bool) -> dict:
    """One benchmark row, printed as it is made: ``case`` (its name and facts), every column, the seconds since ``started``."""
    row = case | score_case(damaged, reference, true_metal, network, args.model, args.settings)
    row["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(row), flush=True)
    return row


# ----- XCIST ---------------------------------------------------------------------------------------

def xcist_case(clean, kind: str, k: int, views: int, ma: float, cache: Path) -> dict:
    """One XCIST case (damaged, metal fraction on the reconstruction's grid, the noisy metal-free scan ``reference``
    and the noise-free metal-free ``truth`` that is scored against), cached in ``cache``."""
    path = cache / f"{kind}-{ma:g}mA-{views}v.npz"
    if not path.exists():
        xc = import_xcist()
        work = cache / "work"
        work.mkdir(parents=True, exist_ok=True)
        hu = clean.array[:, :, k].astype(np.float32)
        metal, material = xcist_metal(kind, hu)
        reference = xcist_scan(xc, work, f"ref{k}-{ma:g}", phantom_fractions(hu), views, ma, seed=k)
        with_metal = {name: f * (1 - metal) for name, f in phantom_fractions(hu).items()} | {material: metal}
        damaged = xcist_scan(xc, work, f"{kind}-{ma:g}", with_metal, views, ma, seed=100 + k)
        # XCIST's reconstruction has the phantom's orientation (checked: correlation with the source slice)
        corr = float(np.corrcoef(np.clip(hu, -500, 500).ravel(), np.clip(reference, -500, 500).ravel())[0, 1])
        if corr < 0.9:
            raise RuntimeError(f"XCIST reconstruction of slice {k} does not match its source (correlation {corr:.3f})")
        np.savez_compressed(path, damaged=damaged, reference=reference, metal=metal, slice=k, mA=ma, views=views, material=material)
    truth_path = cache / f"truth-slice{k}-{views}v.npz"  # the same for every tube current
    if not truth_path.exists():
        xc = import_xcist()
        (cache / "work").mkdir(parents=True, exist_ok=True)
        truth = xcist_scan(xc, cache / "work", f"truth{k}", phantom_fractions(clean.array[:, :, k].astype(np.float32)), views, 800.0,
                            seed=0, noise=False)
        np.savez_compressed(truth_path, reference=truth, slice=k)
    with np.load(path) as saved, np.load(truth_path) as truth:
        return {name: saved[name] for name in saved.files} | {"truth": truth["reference"]}


def run_xcist(args, clean, network: bool) -> list[dict]:
    rows = []
    for ma in args.ma:
        for kind, k in XCIST_CASES[: args.configs]:
            started = time.perf_counter()
            case = xcist_case(clean, kind, k, args.xcist_views, ma, args.xcist)
            grid = clean.slab(k, k + 1)
            damaged = grid.with_array(case["damaged"][:, :, None])
            true_metal = (case["metal"] > 0.25)[:, :, None]
            rows.append(scored_row({"case": f"xcist {kind} {ma:g} mA", "material": str(case["material"])}, damaged,
                                   case["truth"][:, :, None], true_metal, started, args, network))
    return rows


def run_xcist_random(args, network: bool) -> list[dict]:
    """Every case in ``--xcist-random DIR`` (made by ``python -m medinpaint.training.xcist DIR``): random metal in slices
    of the other real CTs (the GE head, the 3 mm abdomen), none of which the gate's settings were chosen on."""
    paths = sorted(args.xcist_random.glob("*.npz"))
    if not paths:
        sys.exit(f"error: no XCIST cases (*.npz) in {args.xcist_random}; make them with python -m medinpaint.training.xcist DIR")
    rows = []
    for path in paths:
        started = time.perf_counter()
        with np.load(path) as case:
            damaged = xcist_volume(case["damaged"][:, :, None])
            facts = {"case": f"xcist {path.stem} {case['kind']} {case['material']} {float(case['mA']):g} mA"}
            rows.append(scored_row(facts, damaged, case["truth"][:, :, None], (case["metal"] > 0.25)[:, :, None], started, args, network))
    return rows


def simulated_case(clean, cached: Path | None, **simulation) -> tuple:
    """(damaged Volume, metal-free reference array, labels) from our simulator, kept in ``cached`` when given."""
    if cached and cached.exists():
        with np.load(cached) as saved:
            return clean.with_array(saved["damaged"]), saved["reference"], saved["labels"]
    damaged, labels, reference = simulate_metal_volume(clean, **simulation)
    if cached:
        cached.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(cached, damaged=damaged.array, reference=reference.array, labels=labels)
    return damaged, reference.array, labels


def run_own(args, clean, network: bool) -> list[dict]:
    rows = []
    for kind, seed in CONFIGS[: args.configs]:
        started = time.perf_counter()
        noise = "" if args.photons == 2e5 else f"-{args.photons:g}photons"
        cached = args.cache / f"own-{kind}-{seed}-{args.views}views{noise}.npz" if args.cache else None
        damaged, reference, labels = simulated_case(clean, cached, seed=seed, kind=kind, views=args.views, photons=args.photons)
        rows.append(scored_row({"case": f"own {kind} seed {seed} {args.photons:g} photons"}, damaged, reference,
                               labels == ArtifactKind.METAL, started, args, network))
    return rows


# (scan, first slice a slab may start at): the 3 mm abdomen's first 20 slices hold a dense object of their own
OTHER_SCANS = (("ct_abdomen_3mm.nii.gz", 20), ("ct_abdomen_dicom", 2), ("ct_head_ge_variable_spacing", 2))


def run_other_scans(args, network: bool) -> list[dict]:
    """Our simulator's metal in 3-slice slabs of every real CT in ``--data``, case i drawn from seed 1000 + i.

    The benchmark's eight cases sit in one scan (``ct_abdomen_dicom``) where the gate was chosen;
    these cases put random metal (rod, ball, irregular, screw; 2e5, 5e5 or 2e6 photons) anywhere
    in the body of a 3 mm abdomen (slices from 20 on: the first hold a dense object of their own,
    which the metal-free reference keeps), the 1 mm abdomen and a GE head CT. Views 720 with
    clinical channel sampling (240 views and channels for the 122 x 101 3 mm grid).
    """
    scans = [medinpaint.load(args.data / name) for name, _ in OTHER_SCANS]
    rows = []
    for i in range(args.other_scans):
        started = time.perf_counter()
        rng = np.random.default_rng(1000 + i)
        which = i % len(scans)
        scan = scans[which]
        kind = ("rod", "ball", "irregular", "screw", "rod")[rng.integers(5)]
        photons = float(rng.choice([2e5, 5e5, 2e6]))
        small = min(scan.shape[:2]) < 256
        k0 = int(rng.integers(OTHER_SCANS[which][1], scan.shape[2] - 5))
        views, channels = (240, 240) if small else (720, None)
        cached = args.cache / f"other-{i:03d}.npz" if args.cache else None
        damaged, reference, labels = simulated_case(scan.slab(k0, k0 + 3), cached, seed=i, kind=kind, views=views, channels=channels,
                                                    photons=photons)
        name = f"other {i} {OTHER_SCANS[which][0].split('.')[0]} slices {k0}-{k0 + 2} {kind} {photons:g} photons"
        rows.append(scored_row({"case": name}, damaged, reference, labels == ArtifactKind.METAL, started, args, network))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--configs", type=int, default=4, help=f"how many cases per noise level (at most {len(CONFIGS)} own, {len(XCIST_CASES)} XCIST)")
    parser.add_argument("--views", type=int, default=720, help="own simulator: views of the simulated scan")
    parser.add_argument("--photons", type=float, default=2e5, help="own simulator: unattenuated photons per ray (noise level)")
    parser.add_argument("--cache", type=Path, help="own simulator: keep simulated cases here (reused when present)")
    parser.add_argument("--xcist", type=Path, help="score XCIST cases instead, made (once) and cached in this folder")
    parser.add_argument("--xcist-views", type=int, default=500, help="XCIST: views over 360 degrees")
    parser.add_argument("--ma", type=lambda s: [float(x) for x in s.split(",")], default=[200.0, 800.0],
                        help="XCIST: tube currents, comma-separated (the noise levels; 1 mm slice, 1 s rotation)")
    parser.add_argument("--xcist-random", type=Path, metavar="DIR",
                        help="score the XCIST cases with random metal in DIR (python -m medinpaint.training.xcist DIR)")
    parser.add_argument("--other-scans", type=int, metavar="N",
                        help="own simulator: N cases of random metal in 3-slice slabs of every real CT in --data (see run_other_scans)")
    parser.add_argument("--model", help=f"the metal model for the network column (default {DEFAULT_METAL_MODEL})")
    parser.add_argument("--no-network", action="store_true", help="skip the network column (slow on the CPU)")
    parser.add_argument("--config", type=Path, help="settings YAML for the default and change_only columns (as `correct --config`), "
                        "e.g. to score another metal.streak_threshold_noise; default: the shipped settings")
    args = parser.parse_args()
    args.settings = load_settings(args.config)
    clean = medinpaint.load(args.data / "ct_abdomen_dicom")
    network = not args.no_network and (args.model is not None or (MODELS_DIR / f"{DEFAULT_METAL_MODEL}.safetensors").is_file())
    if args.xcist:
        try:
            rows = run_xcist(args, clean, network)
        except MedinpaintError as exc:  # XCIST missing: one line, not a traceback
            sys.exit(f"error: {exc}")
    elif args.xcist_random:
        rows = run_xcist_random(args, network)
    elif args.other_scans:
        rows = run_other_scans(args, network)
    else:
        rows = run_own(args, clean, network)
    methods = [m for m in ("uncorrected", "LI", "NMAR", "change_only", "default", "network") if m in rows[0]]
    summary = {}
    for m in methods:
        summary[m] = {key: round(float(np.mean([r[m][key] for r in rows])), 3) for key in ("psnr_db", "ssim", "rmse_hu")}
        summary[m]["streaks"] = {key: round(float(np.mean([r[m]["streaks"][key] for r in rows])), 3) for key in ("psnr_db", "ssim", "rmse_hu")}
    for scores in ("plain", "streaks"):
        get = (lambda r, m, key: r[m][key]) if scores == "plain" else (lambda r, m, key: r[m]["streaks"][key])
        summary[f"default_never_below_uncorrected_{scores}"] = all(
            get(r, "default", "psnr_db") >= get(r, "uncorrected", "psnr_db") and get(r, "default", "ssim") >= get(r, "uncorrected", "ssim")
            for r in rows)
        summary[f"default_minus_uncorrected_db_{scores}"] = round(float(np.mean([get(r, "default", "psnr_db") - get(r, "uncorrected", "psnr_db") for r in rows])), 2)
        summary[f"default_minus_NMAR_db_{scores}"] = round(float(np.mean([get(r, "default", "psnr_db") - get(r, "NMAR", "psnr_db") for r in rows])), 2)
    print(json.dumps({"mean_over_cases": summary}, indent=2))
    slices = sorted((evidence, gain, r["case"], k) for r in rows for k, evidence, gain in r["per_slice"])
    print(f"\nper slice with metal, by streak evidence: streaks gain of correcting it (gate off) over keeping it "
          f"(the gate corrects from {args.settings.metal.gate_threshold:g}, the whole change from {args.settings.metal.gate_full})\n| evidence | gain dB | case | slice |\n|---|---|---|---|")
    for evidence, gain, case, k in slices:
        print(f"| {evidence:.3f} | {gain:+.2f} | {case} | {k} |")
    for scores in ("plain", "streaks"):
        print(f"\n{scores} scores, PSNR dB / SSIM / RMSE HU\n| case | " + " | ".join(methods) + " |\n|---|" + "---|" * len(methods))
        for r in rows:
            cells = [r[m] if scores == "plain" else r[m]["streaks"] for m in methods]
            print(f"| {r['case']} | " + " | ".join(f"{c['psnr_db']:.2f} / {c['ssim']:.3f} / {c['rmse_hu']:.0f}" for c in cells) + " |")


if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "Agg")  # XCIST imports pyplot
    main()
