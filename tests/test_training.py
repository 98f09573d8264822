"""Training runs for real (tiny), resumes, fine-tunes, and runs under torchrun with 2 gloo processes."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from medinpaint.inpaint.models import load_model, read_info
from medinpaint.training.damage import RandDamaged
from medinpaint.training.procedural import procedural_volume

from conftest import REPO, SAMPLE

TINY = """\
seed: 3
output_dir: {out}
steps: {steps}
batch_size: 2
patches_per_volume: 2
patch_size: [32, 32, 16]
lr: 0.001
features: [8, 8, 16, 16, 32, 8]
validation_every: 2
validation_patches: 2
checkpoint_every: 2
threads: 1
data:
  procedural_ct: 2
  procedural_mr: 1
  procedural_shape: [48, 48, 24]
"""


def _config(tmp_path, steps, out="run"):
    path = tmp_path / f"tiny_{steps}.yaml"
    path.write_text(TINY.format(out=tmp_path / out, steps=steps))
    return path


def test_procedural_volumes_look_like_ct_and_mr():
    ct = procedural_volume(1, (64, 64, 32), "CT")
    mr = procedural_volume(1, (64, 64, 32), "MR")
    assert ct.shape == mr.shape == (64, 64, 32)
    assert ct.min() <= -900 and ct.max() >= 700  # air outside, bone shells inside (HU)
    assert (ct > -200).mean() > 0.2  # a body, not an empty box
    assert mr.min() >= 0 and np.isfinite(mr).all()
    assert not np.array_equal(ct, procedural_volume(2, (64, 64, 32), "CT"))


def test_damage_transform_masks_and_prefills():
    image = procedural_volume(0, (32, 32, 16), "MR")[None].astype(np.float32)
    damage = RandDamaged(slice_probability=1.0)
    damage.set_random_state(0)
    out = damage({"image": image})
    mask = out["mask"][0] > 0
    assert mask.any() and out["slices"].any()
    assert np.array_equal(out["prefilled"][0][~mask], image[0][~mask])


def test_train_resume_and_finetune(cli, tmp_path):
    code, _, err = cli("--quiet", "train", "--config", _config(tmp_path, 2))
    assert code == 0, err
    run = tmp_path / "run"
    assert (run / "checkpoint.pt").exists() and (run / "best.safetensors").exists()
    assert any((run / "tensorboard").iterdir())
    first = load_file(str(run / "best.safetensors"))
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 2

    code, _, err = cli("--quiet", "train", "--config", _config(tmp_path, 4), "--resume")
    assert code == 0, err
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["step"] == 4
    assert any(not torch.equal(first[k], state["model"][k]) for k in first)  # it kept learning
    info = read_info(run / "best.safetensors")
    assert info.features == (8, 8, 16, 16, 32, 8) and "gain_db" in info.metadata["validation"]
    load_model(run / "best.safetensors")  # no pickle, architecture from the header

    data = tmp_path / "my_scans"
    data.mkdir()
    (data / "ct.nii.gz").write_bytes((SAMPLE / "ct_abdomen_3mm.nii.gz").read_bytes())
    code, _, err = cli("--quiet", "train", "--init", run / "best.safetensors", "--data", data,
                       "--steps", "2", "--output-dir", tmp_path / "finetuned")
    assert code == 0, err
    tuned = json.loads((tmp_path / "finetuned" / "settings.json").read_text())
    assert tuned["init"] == str(run / "best.safetensors") and tuned["data"]["folders"] == [str(data)]
    assert tuned["slice_prefill"] == info.slice_prefill == "linear"  # fine-tuning keeps the model's pre-fill
    assert (tmp_path / "finetuned" / "best.safetensors").exists()
    assert not tuned["registered_input"]

    # Widened to read registered interpolation of the missing slices too, as slices-v3 was;
    # fine-tuning that model keeps the extra input.
    config = _config(tmp_path, 2, out="registered")
    config.write_text(config.read_text() + f"init: {run / 'best.safetensors'}\nregistered_input: true\n")
    code, _, err = cli("--quiet", "train", "--config", config)
    assert code == 0, err
    wide = tmp_path / "registered" / "best.safetensors"
    assert read_info(wide).registered_input and not read_info(wide).original_input
    code, _, err = cli("--quiet", "train", "--init", wide, "--data", data, "--steps", "2",
                       "--output-dir", tmp_path / "finetuned-registered")
    assert code == 0, err
    assert json.loads((tmp_path / "finetuned-registered" / "settings.json").read_text())["registered_input"]
    assert read_info(tmp_path / "finetuned-registered" / "best.safetensors").registered_input


def test_torchrun_two_cpu_processes_on_gloo(tmp_path):
    config = _config(tmp_path, 2, out="ddp")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "medinpaint.cli.main", "--quiet", "train", "--config", str(config)],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    state = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2
    log = json.loads((tmp_path / "ddp" / "settings.json").read_text())
    assert log["steps"] == 2
    launch = json.loads((tmp_path / "ddp" / "launch.json").read_text())
    assert launch == {"world_size": 2, "backend": "gloo", "device": "cpu"}


def test_metal_training_simulates_pairs_once_and_learns_the_metal_task(tmp_path):
    from medinpaint.config import DataSettings, TrainSettings
    from medinpaint.errors import MedinpaintError
    from medinpaint.training.train import train

    settings = TrainSettings(
        task="metal", output_dir=str(tmp_path / "metal"), steps=3, batch_size=2, patches_per_volume=2,
        patch_size=(32, 32, 16), features=(8, 8, 16, 16, 32, 8), validation_every=3, validation_patches=2,
        checkpoint_every=3, threads=2, device="cpu",
        data=DataSettings(ct=(str(SAMPLE / "ct_abdomen_3mm.nii.gz"),), procedural_ct=0, procedural_mr=0,
                          metal_pairs=2, metal_views=64, metal_pixel_mm=4.0),  # coarse, few views: fast (at 6 mm the streaks barely clear the noise)
    )
    best = train(settings, log=lambda _: None)
    pairs = sorted((tmp_path / "metal" / "pairs").glob("pair-*.npz"))
    assert [p.name for p in pairs] == ["pair-0000.npz", "pair-0001.npz"]
    with np.load(pairs[0]) as pair:
        assert pair["mask"].any() and pair["metal"].any()  # streaks to learn and metal to keep
        assert not (pair["mask"] & pair["metal"]).any()
        changed = pair["prefilled"] != pair["reference"]
        assert changed[pair["mask"]].mean() > 0.5
    stamp = pairs[0].stat().st_mtime_ns
    train(settings, log=lambda _: None)  # a second run reuses the cached pairs
    assert pairs[0].stat().st_mtime_ns == stamp
    # Another run may share the folder, but only when it asks for pairs made the same way.
    shared_dir = replace(settings.data, metal_pairs_dir=str(tmp_path / "metal" / "pairs"))
    with pytest.raises(MedinpaintError, match="its pairs were made with"):
        train(replace(settings, output_dir=str(tmp_path / "other"), data=replace(shared_dir, metal_photons=2e6)),
              log=lambda _: None)
    assert read_info(best).task == "metal"
    assert not read_info(best).original_input
    # Widened from that model to read the damaged scan too (the pairs keep it), as metal-v2 was.
    narrow = tmp_path / "narrow.safetensors"
    best.rename(narrow)
    wide = train(replace(settings, init=str(narrow), original_input=True, l2_weight=1.0,
                         output_dir=str(tmp_path / "wide"), data=shared_dir), log=lambda _: None)
    assert pairs[0].stat().st_mtime_ns == stamp and not (tmp_path / "wide" / "pairs").exists()  # the shared pairs
    assert read_info(wide).original_input and read_info(wide).task == "metal"


def test_masked_losses_ignore_voxels_outside_the_mask():
    from medinpaint.training.train import masked_l1, masked_mse

    target = torch.zeros(1, 1, 4, 4, 2)
    mask = torch.zeros_like(target)
    mask[..., :2, :, :] = 1  # 16 voxels inside
    out = torch.full_like(target, 5.0)  # outside the mask: ignored
    out[..., :2, :, :] = 0.1
    out[0, 0, 0, 0, 0] = 1.0  # one large error, as next to metal
    assert masked_l1(out, target, mask).item() == pytest.approx((15 * 0.1 + 1.0) / 16)
    assert masked_mse(out, target, mask).item() == pytest.approx((15 * 0.01 + 1.0) / 16)


def test_metal_pairs_carry_the_photon_count_they_were_asked_for(tmp_path):
    from medinpaint.training.metal_pairs import make_pair, pair_sources

    sources = pair_sources((str(SAMPLE / "ct_abdomen_3mm.nii.gz"),), 6.0)
    references = {}
    for photons in (2e5, 2e7, 2e9):  # the same pair (seed, number) at three noise levels
        path = tmp_path / f"pair-{photons:g}.npz"
        make_pair(sources, 0, path, seed=0, views=64, photons=photons)
        with np.load(path) as pair:
            ks = np.flatnonzero(pair["metal"].any(axis=(0, 1)))
            references[photons] = pair["reference"][:, :, ks]
    noise = {p: float(np.std(references[p] - references[2e9])) for p in (2e5, 2e7)}  # 2e9: all but noise-free
    assert noise[2e5] > 5 and noise[2e7] < 0.3 * noise[2e5], noise  # noise std falls as 1/sqrt(photons)


@pytest.mark.parametrize("change, message", [
    ({"task": "denoise"}, "choose slices or metal"),
    ({"task": "metal", "registered_input": True}, "registered_input is for task slices"),
    ({"loader_workers": 0}, "loader_workers must be at least 1"),
    ({"l2_weight": -1.0}, "loss weights must be >= 0"),
    ({"l1_weight": 0.0}, "with l1_weight or l2_weight above 0"),
    ({"in_plane_probability": 1.5}, "in_plane_probability must be in"),
    ({"in_plane_min_ratio": 0.5}, "in_plane_min_ratio at least 1"),
])
def test_training_settings_that_cannot_work_fail_before_any_work(tmp_path, change, message):
    from medinpaint.config import TrainSettings
    from medinpaint.errors import MedinpaintError
    from medinpaint.training.train import train

    with pytest.raises(MedinpaintError, match=message):
        train(replace(TrainSettings(output_dir=str(tmp_path / "run")), **change), log=lambda _: None)
    assert not (tmp_path / "run").exists()  # nothing written


def _thick_scan(shape=(160, 160, 6)):
    """Slices 5 times thicker than the pixels, with the same in-plane picture in every slice: any patch
    whose slice axis comes from an in-plane axis is constant along its second axis (the scan's slices)."""
    rng = np.random.RandomState(1)
    plane = rng.rand(*shape[:2]).astype(np.float32)
    return np.repeat(plane[:, :, None], shape[2], axis=2)[None]


def test_in_plane_crops_of_thick_scans_take_an_in_plane_axis_as_the_slice_axis():
    from medinpaint.training.in_plane import RandInPlaneCropd

    image = _thick_scan()
    crop = RandInPlaneCropd((32, 32, 16), prob=1.0, min_ratio=2.0)
    crop.set_random_state(0)
    for _ in range(4):
        out = crop({"image": image, "spacing": (1.0, 1.0, 5.0), "name": "thick"})
        assert "spacing" not in out and out["name"] == "thick"
        patch = out["image"][0]
        assert patch.shape == (32, 32, 16)
        assert np.ptp(patch, axis=1).max() < 1e-5  # the scan's own slice axis: every slice holds the same picture
        assert np.ptp(patch, axis=2).min() > 0.05  # the new slice axis runs across the picture
        np.testing.assert_array_equal(image, _thick_scan())  # the input is not modified


@pytest.mark.parametrize("spacing, prob", [((1.0, 1.0, 5.0), 0.0), ((1.0, 1.0, 1.5), 1.0), (None, 1.0)])
def test_in_plane_crops_leave_other_scans_alone(spacing, prob):
    """Off (prob 0), near-isotropic scans (ratio under min_ratio) and procedural volumes (no spacing)."""
    from medinpaint.training.in_plane import RandInPlaneCropd

    image = _thick_scan()
    out = RandInPlaneCropd((32, 32, 16), prob=prob, min_ratio=2.0)({"image": image, "spacing": spacing})
    assert out["image"] is image and "spacing" not in out


def test_slice_training_crops_a_scan_shorter_than_half_its_crop(tmp_path):
    """A real scan of 6 slices under a crop of 24: padded symmetrically (reflection cannot pad that far),
    and every patch has the patch size."""
    import nibabel as nib

    from medinpaint.config import TrainSettings
    from medinpaint.training.train import patch_pipeline

    path = tmp_path / "short.nii.gz"
    nib.save(nib.Nifti1Image(_thick_scan()[0] * 1000.0 - 500.0, np.diag([1.0, 1.0, 5.0, 1.0])), path)
    settings = TrainSettings(output_dir=str(tmp_path / "run"), patch_size=(32, 32, 16), crop_margin=1.5,
                             patches_per_volume=2)
    patches = patch_pipeline(settings)({"path": str(path), "modality": "CT"})
    assert len(patches) == 2 and all(tuple(p["image"].shape) == (1, 32, 32, 16) for p in patches)
