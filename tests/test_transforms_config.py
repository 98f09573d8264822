"""MONAI pipeline use, settings files, simulate and evaluate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, Lambdad, LoadImaged

import medinpaint
from medinpaint.config import Settings, load_settings, load_train_settings
from medinpaint.errors import MedinpaintError
from medinpaint.transforms import FindArtifactsd, Inpaintd

from conftest import REPO, SAMPLE, shared


def _blank(image: MetaTensor) -> MetaTensor:
    image = image.clone()
    image[..., [20, 61, 62]] = -1024.0
    return image


def test_transforms_inside_a_monai_pipeline():
    pipeline = Compose([
        LoadImaged(keys="image", image_only=True),
        EnsureChannelFirstd(keys="image"),
        Lambdad(keys="image", func=_blank),
        FindArtifactsd(keys="image", artifacts="slices"),  # slices only: this CT also holds a hip implant
        Inpaintd(keys="image", method="classical"),
    ])
    out = pipeline({"image": str(shared("ct_abdomen_3mm.nii.gz"))})
    reference = LoadImaged(keys="image", image_only=True)({"image": str(shared("ct_abdomen_3mm.nii.gz"))})["image"]
    image, labels = out["image"], out["artifact_mask"]
    assert isinstance(image, MetaTensor) and image.shape == (1, *reference.shape)
    assert torch.allclose(image.affine, reference.affine)
    assert out["artifact_mask_summary"]["bad_slices"] == {"20": "blank_slice", "61": "blank_slice", "62": "blank_slice"}
    synthesized = out["synthesized_mask"][0].numpy() > 0
    assert np.array_equal(np.nonzero(synthesized.any(axis=(0, 1)))[0], [20, 61, 62])
    changed = image[0].numpy() != reference.numpy()
    assert not (changed & ~synthesized).any()
    assert out["medinpaint"]["synthesized_voxels"] == int(synthesized.sum())
    assert np.abs(image[0].numpy()[..., 20] - reference.numpy()[..., 20]).mean() < 60


def test_inpaintd_treats_a_plain_mask_as_user_mask():
    image = torch.zeros((1, 32, 32, 16)) + torch.arange(16).float()
    mask = torch.zeros_like(image)
    mask[0, 10:20, 10:20, 5:8] = 1
    out = Inpaintd(keys="image", mask_key="holes", method="classical", modality="MR")({"image": image, "holes": mask})
    assert out["medinpaint"]["artifacts"]["voxels"] == {"user_mask": {"count": 300, "fraction": 300 / image[0].numel()}}
    np.testing.assert_allclose(out["image"][0].numpy(), image[0].numpy(), atol=0.05)  # a smooth ramp is restored


def test_inference_yaml_equals_the_defaults():
    assert load_settings(REPO / "configs" / "inference.yaml") == Settings()


def test_unknown_setting_is_an_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("inference:\n  roi_sise: [64, 64, 32]\n")
    with pytest.raises(MedinpaintError, match="unknown setting.*roi_sise"):
        load_settings(bad)


def test_bad_metal_halo_setting_is_an_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("metal:\n  halo_hu: high\n")
    with pytest.raises(MedinpaintError, match="halo_hu must be a number of HU or null"):
        load_settings(bad)
    bad.write_text("metal:\n  halo_hu: null\n  halo_px: 0\n")
    with pytest.raises(MedinpaintError, match="halo_px must be an integer of at least 1"):
        load_settings(bad)
    bad.write_text("metal:\n  halo_streak_hu: -300\n")
    with pytest.raises(MedinpaintError, match="halo_streak_hu must be a positive number"):
        load_settings(bad)
    off = tmp_path / "off.yaml"
    off.write_text("metal:\n  halo_hu: null\n")
    assert load_settings(off).metal.halo_hu is None


def test_training_recipe_checks_the_pairs_rim_threshold_when_read(tmp_path):
    recipe = tmp_path / "train.yaml"
    recipe.write_text("task: metal\ndata:\n  metal_halo_hu: high\n")
    with pytest.raises(MedinpaintError, match="data.metal_halo_hu: metal halo_hu must be a number of HU or null, not 'high'"):
        load_train_settings(recipe)
    recipe.write_text("task: metal\ndata:\n  metal_halo_hu: 600\n")
    assert load_train_settings(recipe).data.metal_halo_hu == 600


def test_shipped_training_recipe_holds_out_the_evaluation_scan():
    settings = load_train_settings(REPO / "configs" / "train_default.yaml")
    used = " ".join(settings.data.ct + settings.data.mr + settings.data.folders)
    assert "ct_abdomen_dicom" not in used and settings.steps > 0


def test_simulate_then_evaluate(cli, tmp_path):
    damaged = tmp_path / "damaged.nii.gz"
    code, _, err = cli("--quiet", "simulate", SAMPLE / "ct_abdomen_3mm.nii.gz", damaged, "--seed", "4", "--run", "3", "--count", "2")
    assert code == 0, err
    truth = medinpaint.load(tmp_path / "damaged_desc-damage_mask.nii.gz").array > 0
    ks = np.nonzero(truth.any(axis=(0, 1)))[0]
    assert len(ks) == 6 and truth[:, :, ks].all()
    found = medinpaint.find_artifacts(medinpaint.load(damaged))
    assert sorted(found.bad_slices) == ks.tolist()
    # Same seed, same damage.
    again = tmp_path / "again.nii.gz"
    assert cli("--quiet", "simulate", SAMPLE / "ct_abdomen_3mm.nii.gz", again, "--seed", "4", "--run", "3", "--count", "2")[0] == 0
    assert np.array_equal(medinpaint.load(again).array, medinpaint.load(damaged).array)

    fixed = tmp_path / "fixed.nii.gz"
    assert cli("--quiet", "correct", damaged, fixed, "--method", "classical")[0] == 0
    code, out, _ = cli("evaluate", SAMPLE / "ct_abdomen_3mm.nii.gz", fixed, "--mask", tmp_path / "damaged_desc-damage_mask.nii.gz")
    repaired = json.loads(out)
    code2, out2, _ = cli("evaluate", SAMPLE / "ct_abdomen_3mm.nii.gz", damaged, "--mask", tmp_path / "damaged_desc-damage_mask.nii.gz")
    broken = json.loads(out2)
    assert code == code2 == 0
    assert repaired["psnr_db"] > broken["psnr_db"] + 10
    assert repaired["mae"] < broken["mae"] / 5
    assert 0 < broken["ssim"] < repaired["ssim"] <= 1
