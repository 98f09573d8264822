"""The metal path end to end: detection on a real implant, simulation, and correction on the CLI."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from scipy import ndimage

import medinpaint
from medinpaint.artifacts.labels import ArtifactKind
from medinpaint.config import Settings
from medinpaint.errors import MedinpaintError
from medinpaint.inpaint.models import DEFAULT_METAL_MODEL, DEFAULT_MODEL, MODELS_DIR
from medinpaint.metal.masks import metal_halo
from medinpaint.metrics import masked_metrics, metal_scored_region
from medinpaint.simulate import simulate_metal_volume

from conftest import shared


@pytest.fixture(scope="module")
def abdomen():
    return medinpaint.load(shared("ct_abdomen_3mm.nii.gz"))


@pytest.fixture(scope="module")
def steel_ball(abdomen):
    """A steel ball re-scanned into 12 metal-free slices of the real CT (3 mm, 240 views: fast)."""
    part = abdomen.slab(40, 52)
    damaged, labels, reference = simulate_metal_volume(part, seed=3, kind="ball", views=240, channels=240)
    return part, damaged, labels, reference


def test_real_hip_implant_is_found_and_only_there(abdomen):
    found = medinpaint.find_artifacts(abdomen)  # auto: slices and, in a CT, metal
    metal_slices = set(np.flatnonzero((found.labels == ArtifactKind.METAL).any(axis=(0, 1))).tolist())
    streak_slices = set(np.flatnonzero((found.labels == ArtifactKind.METAL_STREAK).any(axis=(0, 1))).tolist())
    assert metal_slices and max(metal_slices) <= 15  # the prosthesis sits in the lowest slices
    assert streak_slices <= metal_slices
    assert (found.labels == ArtifactKind.METAL).sum() >= 400  # the head of the implant, above 2500 HU
    assert found.bad_slices == {}
    assert sorted(found.metal_gate) == sorted(metal_slices)  # the gate decided every slice with metal
    assert set(found.metal_corrected) == streak_slices  # corrected: the slices it let through, and only those
    assert not found.synthesized[found.labels == ArtifactKind.METAL].any()  # metal is kept, never synthesized
    assert not medinpaint.find_artifacts(abdomen, artifacts="slices").labels.any()


def test_simulated_metal_differs_from_reference_only_where_metal_is(steel_ball):
    part, damaged, labels, reference = steel_ball
    ks = np.flatnonzero((labels == ArtifactKind.METAL).any(axis=(0, 1)))
    others = np.setdiff1d(np.arange(part.shape[2]), ks)
    assert len(ks) >= 1 and len(others) >= 1
    assert np.array_equal(damaged.array[:, :, others], part.array[:, :, others])
    assert np.array_equal(reference.array[:, :, others], part.array[:, :, others])
    assert (labels == ArtifactKind.METAL_STREAK).sum() > 100  # streaks of more than 50 HU
    assert damaged.array[labels == ArtifactKind.METAL].mean() > 2500


def test_classical_correction_reduces_the_error_and_keeps_the_rest(steel_ball):
    _, damaged, labels, reference = steel_ball
    found = medinpaint.find_artifacts(damaged, artifacts="metal")
    metal = found.labels == ArtifactKind.METAL
    streaks = found.labels == ArtifactKind.METAL_STREAK
    true_metal = labels == ArtifactKind.METAL
    assert metal[true_metal].all()  # every metal voxel found (with its one-voxel rim) ...
    near = ndimage.binary_dilation(true_metal, np.ones((9, 9, 1), bool))  # blooming of a 3 mm-pixel FBP
    assert not (metal & ~near).any()  # ... and no metal claimed away from it
    halo = np.moveaxis(metal_halo(np.moveaxis(damaged.array, 2, 0), np.moveaxis(metal, 2, 0)), 0, 2)
    gated_in = sorted(found.metal_corrected)
    assert gated_in and halo[:, :, gated_in].any() and streaks[:, :, gated_in][halo[:, :, gated_in]].all()  # the re-filled rim is synthesized
    result = medinpaint.correct(damaged, found, method="classical")
    fixed = result.volume.array
    assert np.array_equal(fixed[~streaks], damaged.array[~streaks])  # metal and every other voxel as acquired
    region = np.zeros(labels.shape, bool)
    region[:, :, np.flatnonzero(true_metal.any(axis=(0, 1)))] = True
    region &= ~(metal | true_metal)
    before = masked_metrics(reference.array, damaged.array, region, "CT")
    after = masked_metrics(reference.array, fixed, region, "CT")
    # change-only keeps voxels whose change is below the slice's noise as acquired: a smaller gain than
    # the old full NMAR round trip here (0.83 of the RMSE measured, was < 0.7), without its blur elsewhere
    assert after["rmse"] < 0.9 * before["rmse"], (before, after)
    assert result.parameters["metal"]["slices_with_streaks"]
    assert "below -1100 HU (photon starvation) raised to air" in result.parameters["metal"]["streaks"]  # the provenance names every step that writes voxels


def test_metal_simulate_and_correct_on_the_cli(cli, tmp_path, abdomen):
    from medinpaint.data.save import write_file

    clean = tmp_path / "clean.nii.gz"
    write_file(abdomen.slab(40, 52), clean, "nifti", "int16")
    damaged = tmp_path / "metal.nii.gz"
    code, _, err = cli("--quiet", "simulate", clean, damaged, "--artifact", "metal", "--seed", "5", "--kind", "rod",
                       "--views", "240")
    assert code == 0, err
    labels = medinpaint.load(tmp_path / "metal_desc-damage_mask.nii.gz").array
    assert (labels == ArtifactKind.METAL).any() and (labels == ArtifactKind.METAL_STREAK).any()
    assert medinpaint.load(tmp_path / "metal_desc-reference.nii.gz").same_grid(medinpaint.load(damaged))
    # --photons sets the noise (std against an all but noise-free re-scan): 10x the photons, 1/sqrt(10) of it.
    for name, photons in (("quiet", "2e6"), ("silent", "2e9")):
        code, _, err = cli("--quiet", "simulate", clean, tmp_path / f"{name}.nii.gz", "--artifact", "metal", "--seed", "5",
                           "--kind", "rod", "--views", "240", "--photons", photons)
        assert code == 0, err
    ks = np.flatnonzero(labels.any(axis=(0, 1)))
    silent = medinpaint.load(tmp_path / "silent_desc-reference.nii.gz").array[:, :, ks]
    noise = {name: float(np.std(medinpaint.load(tmp_path / f"{name}_desc-reference.nii.gz").array[:, :, ks] - silent))
             for name in ("metal", "quiet")}
    assert noise["metal"] > 5 and 0.2 * noise["metal"] < noise["quiet"] < 0.45 * noise["metal"], noise
    code, _, err = cli("--quiet", "simulate", clean, tmp_path / "none.nii.gz", "--artifact", "metal", "--photons", "0")
    assert code == 2 and "--photons must be above 0" in err and not list(tmp_path.glob("none*")), err

    fixed = tmp_path / "fixed.nii.gz"
    code, _, err = cli("--quiet", "correct", damaged, fixed, "--artifacts", "metal", "--method", "classical")
    assert code == 0, err
    mask = medinpaint.load(tmp_path / "fixed_desc-synthesized_mask.nii.gz").array
    provenance = json.loads((tmp_path / "fixed.json").read_text())
    assert "NMAR" in json.dumps(provenance) and not (mask == ArtifactKind.METAL).any()
    gate = provenance["ArtifactsFound"]["metal_gate"]  # a thin rod: mild streaks, which the gate may keep as acquired
    assert gate and (mask == ArtifactKind.METAL_STREAK).any() == any(d["decision"].startswith("corrected") for d in gate.values())
    # A slice model given as the metal model: one clear line, nothing written (gate off, so the streaks are refined).
    force = tmp_path / "force.yaml"
    force.write_text("metal:\n  gate: \"off\"\n")
    code, _, err = cli("--quiet", "correct", damaged, tmp_path / "wrong.nii.gz", "--artifacts", "metal",
                       "--metal-model", DEFAULT_MODEL, "--config", force)
    assert code == 2 and "not a metal-streak model" in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.glob("wrong*"))


def test_metal_on_mr_is_a_clear_error(cli, tmp_path):
    mr = medinpaint.load(shared("mr_brain_t1.nrrd"))
    with pytest.raises(MedinpaintError, match="metal artifacts are found in CT"):
        medinpaint.find_artifacts(mr, artifacts="metal")
    code, _, err = cli("--quiet", "correct", shared("mr_brain_t1.nrrd"), tmp_path / "x.nii.gz", "--artifacts", "metal")
    assert code == 2 and err.count("\n") == 1 and "CT" in err
    assert not list(tmp_path.iterdir())


def test_a_chosen_metal_model_is_used_and_a_model_of_the_wrong_task_refused(steel_ball):
    _, damaged, _, _ = steel_ball
    found = medinpaint.find_artifacts(damaged, artifacts="metal")
    assert (found.labels == ArtifactKind.METAL_STREAK).any()
    assert "refined_by" not in medinpaint.correct(damaged, found).parameters["metal"]  # the default: change-only, no network
    refined = Settings(metal=dataclasses.replace(Settings().metal, refine="network"))
    by_setting = medinpaint.correct(damaged, found, settings=refined)
    as_file = medinpaint.correct(damaged, found, metal_model=str(MODELS_DIR / f"{DEFAULT_METAL_MODEL}.safetensors"))
    assert np.array_equal(by_setting.volume.array, as_file.volume.array)
    assert as_file.parameters["metal"]["refined_by"]["File"] == f"{DEFAULT_METAL_MODEL}.safetensors"
    with pytest.raises(MedinpaintError, match="not a metal-streak model"):
        medinpaint.correct(damaged, found, metal_model=DEFAULT_MODEL)
    blanked = damaged.array.copy()
    blanked[:, :, 0] = blanked.min()
    gaps = medinpaint.find_artifacts(damaged.with_array(blanked), artifacts="slices")
    assert gaps.bad_slices
    with pytest.raises(MedinpaintError, match="is a metal model; pass it as the metal model"):
        medinpaint.correct(damaged.with_array(blanked), gaps, model=DEFAULT_METAL_MODEL)


def test_metal_is_scored_in_the_body_without_the_metal_and_its_edge():
    """The benchmark and the trust-weight training score the same voxels: body, not the metal grown by a pixel."""
    reference = np.full((20, 20), -1000.0)
    reference[3:17, 3:17] = 40.0
    reference[5:7, 5:7] = -900.0  # air inside the body (a gas pocket) is scored: holes are filled
    metal = np.zeros((20, 20), bool)
    metal[9:11, 9:11] = True
    region = metal_scored_region(reference, metal)
    assert region[3, 3] and region[16, 16] and region[7, 7] and region[5:7, 5:7].all() and not region[2, 2] and not region[0, 10]
    assert not region[8:12, 8:12].any() and region[8:12, 8:12].size == 16  # the metal and its 8-neighbours
    volume = np.stack([reference, reference + 5], axis=2)
    both = metal_scored_region(volume, np.stack([metal, np.zeros_like(metal)], axis=2))
    assert np.array_equal(both[:, :, 0], region) and both[:, :, 1].sum() == 14 * 14
