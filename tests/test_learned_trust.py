"""The learned trust weight of the metal correction, and the XCIST training-case helpers (without XCIST itself)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from scipy import ndimage

from medinpaint.artifacts.metal import MetalDetection
from medinpaint.errors import MedinpaintError
from medinpaint.inpaint.models import load_trust_model
from medinpaint.metal.learned_trust import TrustNet, learned_weight, trust_inputs
from medinpaint.metal.trust import change_weight, trust_keep_out
from medinpaint.training.xcist import XCIST_PIXEL_MM, import_xcist, on_xcist_grid, random_metal


def _slice(seed: int = 0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:96, :96]
    image = np.where((yy - 48) ** 2 + (xx - 48) ** 2 < 40**2, 40.0, -1000.0) + rng.normal(0, 20, (96, 96))
    metal = (yy - 40) ** 2 + (xx - 50) ** 2 < 9
    streak = 200 * np.cos(np.arctan2(yy - 40, xx - 50) * 6) * np.exp(-np.hypot(yy - 40, xx - 50) / 30)
    image = np.where(metal, 3000.0, image + streak)
    wrong = 150 * np.exp(-((yy - 62) ** 2 + (xx - 30) ** 2) / 60.0)  # structure the image does not show
    change = ndimage.gaussian_filter(np.where(metal, 0.0, -streak * 0.8 + wrong), 1.0)
    return image.astype(np.float32), change.astype(np.float32), metal


def test_untrained_network_is_the_gradient_rule():
    image, change, metal = _slice()
    rule = change_weight(image, change, trust_keep_out(metal), (1.0, 1.0), 20.0)
    weight = learned_weight(TrustNet(), image, change, metal, np.zeros_like(metal), (1.0, 1.0), 20.0, 20.0)
    inside = (rule > 0.01) & (rule < 0.99)
    assert inside.sum() > 100
    np.testing.assert_allclose(weight[inside], rule[inside], atol=1e-4)
    assert weight.min() >= 0 and weight.max() <= 1


def test_inputs_are_scaled_and_finite():
    image, change, metal = _slice(1)
    x = trust_inputs(image, change, metal, np.zeros_like(metal), np.ones_like(image), noise_hu=25.0)
    assert x.shape == (8, 96, 96) and np.isfinite(x).all() and np.abs(x).max() <= 3.0


def test_a_slices_model_is_refused_as_trust_model():
    with pytest.raises(MedinpaintError, match="not a metal trust-weight model"):
        load_trust_model("medinpaint-slices-v3")


def test_trust_model_needs_the_rule_window():
    with pytest.raises(MedinpaintError, match="trust_model"):
        MetalDetection(trust_model="medinpaint-metal-trust-v1", trust_window_mm=None)


@pytest.mark.parametrize("seed", range(12))
def test_random_metal_lies_in_the_body(seed):
    hu = np.full((128, 128), -1000.0, np.float32)
    yy, xx = np.mgrid[:128, :128]
    body = (yy - 64) ** 2 / 55**2 + (xx - 64) ** 2 / 45**2 < 1
    hu[body] = 40.0
    fraction, material, kind = random_metal(hu, np.random.default_rng(seed))
    assert material in ("Ti", "Fe", "Ag") and kind in ("rods", "screws", "ball", "wires", "dental")
    assert fraction.sum() > 0.5 and fraction.min() >= 0 and fraction.max() <= 1
    assert fraction[~body].sum() == 0


def test_on_xcist_grid_resamples_and_centres():
    head = np.full((200, 160), 40.0, np.float32)
    head[0, 0] = np.nan
    out = on_xcist_grid(head, (XCIST_PIXEL_MM / 2, XCIST_PIXEL_MM / 2), n=256)
    assert out.shape == (256, 256) and np.isfinite(out).all()
    inside = np.argwhere(out > 0)
    assert tuple(inside.max(0) - inside.min(0) + 1) == (100, 80)  # half the pixels
    assert abs(inside.mean(0) - 127.5).max() < 1.0


def test_missing_xcist_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "gecatsim", None)
    with pytest.raises(MedinpaintError, match="pip download --no-deps gecatsim"):
        import_xcist()


def test_trust_net_is_deterministic_on_cpu():
    torch.manual_seed(0)
    net = TrustNet().eval()
    x = torch.rand(1, 8, 64, 80)
    with torch.inference_mode():
        assert torch.equal(net(x), net(x)) and net(x).shape == (1, 1, 64, 80)


def test_trust_model_setting_runs_end_to_end_and_is_named_in_the_provenance(tmp_path):
    """An untrained trust network is the gradient rule, so the corrected slices match the rule's; the provenance names it."""
    import dataclasses
    import json

    from safetensors.torch import save_file

    import medinpaint
    from medinpaint.config import Settings
    from medinpaint.simulate import simulate_metal_volume

    from conftest import shared

    net = TrustNet((8, 8, 16, 16, 32, 8))
    path = tmp_path / "trust.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path),
              metadata={"task": "metal-trust", "features": json.dumps([8, 8, 16, 16, 32, 8])})
    damaged, _, _ = simulate_metal_volume(medinpaint.load(shared("ct_abdomen_3mm.nii.gz")).slab(40, 43), seed=2, kind="screw",
                                          views=240, channels=240)
    rule = Settings()
    learned = Settings(metal=dataclasses.replace(rule.metal, trust_model=str(path)))
    by_rule = medinpaint.find_artifacts(damaged, artifacts="metal", metal_settings=rule.metal)
    by_net = medinpaint.find_artifacts(damaged, artifacts="metal", metal_settings=learned.metal)
    assert by_rule.metal_corrected and set(by_rule.metal_corrected) == set(by_net.metal_corrected)
    for k, corrected in by_rule.metal_corrected.items():
        np.testing.assert_allclose(by_net.metal_corrected[k], corrected, atol=1.0)  # weights within 1e-3 of 0 or 1 are snapped
    result = medinpaint.correct(damaged, by_net, method="classical", settings=learned)
    written = json.dumps(result.parameters, default=str)
    assert '"trust_model": {"name": "trust"' in written and result.parameters and path.stem == "trust"


def test_training_learns_to_keep_what_the_rule_removes():
    """A change that also removes real anatomy (NMAR's prior taking bone for streaks): the rule keeps it, since it cancels
    what the image shows; a few training steps on that slice learn to keep the bone (the loop and the loss work)."""
    from medinpaint.training.metal_trust import evaluate, train

    yy, xx = np.mgrid[:96, :96]
    body = np.where((yy - 48) ** 2 + (xx - 48) ** 2 < 44**2, 40.0, -1000.0)
    bone = 600.0 * ndimage.gaussian_filter(((yy - 66) ** 2 + (xx - 28) ** 2 < 36).astype(float), 1.0)
    metal = (yy - 40) ** 2 + (xx - 50) ** 2 < 9
    streak = 200 * np.cos(np.arctan2(yy - 40, xx - 50) * 6) * np.exp(-np.hypot(yy - 40, xx - 50) / 30)
    truth = np.where(metal, 3000.0, body + bone).astype(np.float32)
    image = np.where(metal, 3000.0, body + bone + streak).astype(np.float32)
    change = np.where(metal, 0.0, -streak - bone).astype(np.float32)
    rule = change_weight(image, change, trust_keep_out(metal), (1.0, 1.0), 20.0)
    record = {"name": "synthetic", "evidence": 1.0, "image": image, "change": change, "truth": truth, "metal": metal,
              "region": (body > 0) & ~ndimage.binary_dilation(metal, np.ones((3, 3), bool)),
              "inputs": trust_inputs(image, change, metal, np.zeros_like(metal), rule, 20.0)}
    torch.set_num_threads(1)
    model = train([record], steps=60, batch_size=2, crop=96, lr=3e-3, features=(8, 8, 16, 16, 32, 8), log_every=1000)
    row = evaluate(model, [record])[0]
    assert row["net"][0] > row["rule"][0] + 1.0, row  # streaks gain over uncorrected, dB
