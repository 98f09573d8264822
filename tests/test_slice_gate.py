"""The slice gate (never below the best classical fill, measured on the scan) and per-scan adaptation."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage

import medinpaint
from medinpaint.artifacts.find import ArtifactMask
from medinpaint.artifacts.labels import ArtifactKind
from medinpaint.config import Settings
from medinpaint.data.volume import Volume
from medinpaint.errors import MedinpaintError
from medinpaint.inpaint.adapt import adaptation_steps
from medinpaint.inpaint.classical import choose_slice_order, interpolate_slices
from medinpaint.inpaint.gate import classical_left_out, decide, gap_lengths, leave_out_picks
from medinpaint.inpaint.models import load_model

from conftest import shared


def _damaged(array: np.ndarray, affine: np.ndarray, bad: list[int]) -> tuple[Volume, ArtifactMask]:
    labels = np.zeros(array.shape, np.uint8)
    labels[:, :, bad] = ArtifactKind.MISSING_SLICE
    damaged = array.copy()
    damaged[:, :, bad] = np.nan  # the fill must not see the truth
    return Volume(damaged, affine, modality="CT"), ArtifactMask.from_labels(labels, affine, sources=["test"])


# Windows as large as the 96 x 96 crops, not the default 128 x 128 (mirror padding would double the work).
QUICK = replace(Settings(), inference=replace(Settings().inference, roi_size=(96, 96, 16)))


def _rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a.astype(np.float64) - b) ** 2)))


def test_gap_lengths_and_picks_keep_clear_of_the_real_gaps():
    assert gap_lengths([3, 9, 10, 11, 20, 21, 22, 23, 24, 25, 26]) == [1, 3, 5]  # 7 is measured as 5
    bad = [6, 13, 14, 15]
    picks = leave_out_picks(40, bad, [1, 3], count=4, seed=0)
    assert picks == leave_out_picks(40, bad, [1, 3], count=4, seed=0)  # deterministic
    assert picks != leave_out_picks(40, bad, [1, 3], count=4, seed=1)
    hidden = {k for p in picks for k in p}
    assert [len(p) for p in picks].count(3) == 4 and [len(p) for p in picks].count(1) >= 2
    for run in picks:  # acquired, and two acquired slices no other run hides on each side
        assert set(run).isdisjoint(bad)
        remaining = [k for k in range(40) if k not in set(bad) | hidden]
        assert len([k for k in remaining if k < run[0]]) >= 2 and len([k for k in remaining if k > run[-1]]) >= 2
        assert set(range(max(k for k in remaining if k < run[0]), run[0])).isdisjoint(hidden)
    for run in leave_out_picks(40, bad, [1, 3], count=2, seed=0):  # where there is room, runs keep clear of the real gaps
        assert set(range(run[0] - 2, run[-1] + 3)).isdisjoint(bad)


def test_adapt_setting_is_checked():
    import torch

    settings = Settings().adapt
    assert adaptation_steps("off", torch.device("cpu"), 30, settings)[0] == 0
    assert adaptation_steps("auto", torch.device("cpu"), 30, settings)[0] == settings.auto_steps_cpu
    assert adaptation_steps("auto", torch.device("cpu"), 5, settings)[0] == 0  # too few slices to learn from
    assert adaptation_steps("7", torch.device("cpu"), 30, settings)[0] == 7
    for bad in ("fast", "-3", "2.5"):
        with pytest.raises(MedinpaintError):
            adaptation_steps(bad, torch.device("cpu"), 30, settings)


@pytest.fixture(scope="module")
def resampled():
    """A real CT crop made from thicker slices: every 2nd slice, cubic up-sampled back (96 x 96 x 24)."""
    volume = medinpaint.load(shared("ct_abdomen_3mm.nii.gz"))
    crop = volume.array[12:108, 3:99, 40:64].astype(np.float32)
    truth = ndimage.zoom(crop[:, :, ::2], (1, 1, 2), order=3).astype(np.float32)
    bad = [7, 15, 16, 17]
    damaged, artifacts = _damaged(truth, volume.affine, bad)
    result = medinpaint.correct(damaged, artifacts, settings=QUICK, device="cpu")
    return truth, damaged, bad, result


def test_gate_never_loses_to_cubic_on_a_resampled_volume(resampled):
    truth, damaged, bad, result = resampled
    written = result.volume.array[:, :, bad]
    cubic = interpolate_slices(damaged.array, bad, "cubic")[:, :, bad]
    same = np.abs(written - cubic).max() <= 1.0
    assert same or _rmse(written, truth[:, :, bad]) < _rmse(cubic, truth[:, :, bad])
    gate = result.parameters["slice_gate"]
    if same:  # the gate measured the network below cubic on this scan's own slices
        assert gate["choice"] == "cubic"


def test_provenance_holds_the_gates_scores_and_decision(resampled):
    gate = resampled[3].parameters["slice_gate"]
    assert gate["gap_lengths"] == [1, 3] and gate["pick_count"] == len(gate["picks"]) >= 2
    assert set(gate["left_out_psnr_db"]) == {"linear", "cubic", "registered", "network"}
    assert all(np.isfinite(v) for v in gate["left_out_psnr_db"].values())
    scores = gate["left_out_psnr_db"]
    assert gate["best_classical"] == max(("linear", "cubic", "registered"), key=scores.get)
    assert all(len(v) == gate["pick_count"] for v in gate["per_pick_psnr_db"].values())
    chosen = gate["classical_choice"]
    network = gate["comparisons"][f"network vs {chosen}"]
    assert network["pooled_gain_db"] == pytest.approx(scores["network"] - scores[chosen], abs=1e-3)
    network_wins = min(network["pooled_gain_db"], network["lower_bound_db"]) > gate["margin_db"]
    assert gate["choice"] == ("network" if network_wins else chosen)
    assert gate["why"] and gate["rule"] and gate["margin_db"] == Settings().gate.margin_db
    # the gate's picks are acquired slices, away from the real gaps
    assert not set(k for run in gate["picks"] for k in run) & set(resampled[2])


def test_gate_off_writes_the_network(resampled):
    truth, damaged, bad, _ = resampled
    labels = np.zeros(truth.shape, np.uint8)
    labels[:, :, bad] = ArtifactKind.MISSING_SLICE
    artifacts = ArtifactMask.from_labels(labels, damaged.affine, sources=["test"])
    off = medinpaint.correct(damaged, artifacts, settings=QUICK, gate=False, device="cpu")
    assert "slice_gate" not in off.parameters
    cubic = interpolate_slices(damaged.array, bad, "cubic")
    assert np.abs(off.volume.array[:, :, bad] - cubic[:, :, bad]).max() > 1.0  # the network's own fill


def test_shipped_default_beats_its_prefill_on_the_held_out_scan():
    """Quality regression: medinpaint-slices-v3 never saw ct_abdomen_dicom; runs of 3 are where it helps."""
    volume = medinpaint.load(shared("ct_abdomen_dicom"))
    truth = volume.array[160:256, 208:304, :].astype(np.float32)
    bad = [4, 5, 6, 12, 13, 14]
    damaged, artifacts = _damaged(truth, volume.affine, bad)
    network = medinpaint.correct(damaged, artifacts, gate=False, device="cpu").volume.array
    _, info = load_model(None)
    valid = [k for k in range(truth.shape[2]) if k not in bad]
    order = choose_slice_order(damaged.array, valid) if info.slice_prefill == "auto" else info.slice_prefill
    prefill = interpolate_slices(damaged.array, bad, order)
    assert _rmse(network[:, :, bad], truth[:, :, bad]) < _rmse(prefill[:, :, bad], truth[:, :, bad])


def test_adaptation_lowers_the_left_out_error_and_says_so(tmp_path):
    volume = medinpaint.load(shared("ct_abdomen_dicom"))
    truth = volume.array[160:256, 208:304, :].astype(np.float32)
    damaged, artifacts = _damaged(truth, volume.affine, [9, 10, 11])
    base = QUICK
    # no time limit (the steps decide, so the result does not depend on the machine's load); the gate off: only the networks are scored
    settings = replace(base, adapt=replace(base.adapt, patches=4, seconds=1e6), gate=replace(base.gate, enabled=False))
    saved = tmp_path / "adapted.safetensors"
    result = medinpaint.correct(damaged, artifacts, settings=settings, adapt=60, save_adapted=str(saved), device="cpu")
    adaptation = result.parameters["slice_gate"]["adaptation"]
    assert adaptation["steps"] == 60 and adaptation["seconds"] > 0
    assert adaptation["loss_last_steps"] < adaptation["loss_first_steps"]
    assert adaptation["left_out_psnr_after_db"] > adaptation["left_out_psnr_before_db"]
    assert result.parameters["slice_gate"]["choice"] == "adapted network"
    net, info = load_model(str(saved))  # --model reads it back
    assert info.metadata["adapted_from"]["name"] == "medinpaint-slices-v3" and info.slice_prefill == "auto"


def test_cli_refuses_bad_adapt_options_before_any_work(cli, tmp_path):
    source = tmp_path / "missing_input.nii.gz"  # never read: the options are checked first
    code, _, err = cli("correct", source, tmp_path / "out.nii.gz", "--adapt", "fast")
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: --adapt fast")
    code, _, err = cli("correct", source, tmp_path / "out.nii.gz", "--adapt", "5", "--save-adapted", tmp_path / "model.pt")
    assert code == 2 and "must end in .safetensors" in err
    assert not list(tmp_path.iterdir())


def test_sparse_gaps_still_get_picks_predicted_across_them():
    bad = list(range(2, 20, 4))  # every 4th slice missing: no acquired run two slices clear of a gap
    picks = leave_out_picks(22, bad, [1], count=3, seed=0)
    assert len(picks) == 3 and not set(k for p in picks for k in p) & set(bad)


def _decide(**sse):
    return decide({m: np.array(v, float) for m, v in sse.items()}, ("linear", "cubic", "registered"), "cubic", "network", 0.1, 0.95)


def test_one_lucky_pick_does_not_choose_a_method():
    """Pooled, registered is 8 dB better (one pick decides it); it loses the other nine: cubic stays."""
    cubic, registered = [1.0] * 9 + [100.0], [1.3] * 9 + [5.0]
    choice, record = _decide(linear=[2.0] * 10, cubic=cubic, registered=registered, network=[1.2] * 10)
    assert record["best_classical"] == "registered"  # what choosing the best pooled score would write
    assert choice == "cubic" and record["comparisons"]["registered vs cubic"]["better_on_picks"] == "1 of 10"


def test_a_clear_win_is_taken_and_one_pick_proves_nothing():
    rng = np.random.default_rng(0)
    cubic = rng.uniform(1, 3, 8)
    linear = cubic * rng.uniform(0.6, 0.7, 8)  # about 2 dB better on every pick
    choice, record = _decide(linear=linear, cubic=cubic, registered=cubic * 1.5, network=linear * 1.01)
    assert choice == "linear" and record["classical_choice"] == "linear"
    choice, _ = _decide(linear=linear, cubic=cubic, registered=cubic * 1.5, network=linear * 0.7)  # 1.5 dB on every pick
    assert choice == "network"
    choice, record = _decide(linear=[1.0], cubic=[2.0], registered=[2.0], network=[0.5])
    assert choice == "cubic" and record["comparisons"]["linear vs cubic"]["lower_bound_db"] is None


def test_picks_in_dense_damage_have_acquired_neighbours_like_the_real_gaps():
    bad = [k for s in range(2, 28, 6) for k in range(s, s + 3)]  # runs of 3, three acquired slices between them
    picks = leave_out_picks(32, bad, [3], count=8, seed=0)
    assert len(picks) >= 2
    for run in picks:  # never walled in by real gaps (a wider gap than any real one): shortened instead
        assert run[0] - 1 not in bad and run[-1] + 1 not in bad and len(run) == 1


def test_gate_keeps_cubic_on_a_resampled_volume_with_dense_runs():
    """Runs of 3 missing every 6 slices of a cubic-resampled real crop: runs walled in by the real gaps
    favour registered, yet cubic fills the real gaps best; the gate must write cubic (or better)."""
    volume = medinpaint.load(shared("ct_abdomen_3mm.nii.gz"))
    crop = volume.array[30:94, 21:85, 40:72].astype(np.float32)
    truth = ndimage.zoom(crop[:, :, ::2], (1, 1, 2), order=3).astype(np.float32)
    bad = [k for s in range(2, 28, 6) for k in range(s, s + 3)]
    damaged, artifacts = _damaged(truth, volume.affine, bad)
    walled = [[5, 6, 7], [17, 18, 19]]  # what the gate measured before: acquired runs between two real gaps
    real, predicted = classical_left_out(truth, bad, [k for run in walled for k in run], ("cubic", "registered"))
    assert _rmse(predicted["registered"], real) < _rmse(predicted["cubic"], real)
    settings = replace(QUICK, inference=replace(QUICK.inference, roi_size=(64, 64, 16)))
    result = medinpaint.correct(damaged, artifacts, settings=settings, device="cpu")
    written = result.volume.array[:, :, bad]
    cubic = interpolate_slices(damaged.array, bad, "cubic")[:, :, bad]
    assert np.abs(written - cubic).max() <= 1.0 or _rmse(written, truth[:, :, bad]) < _rmse(cubic, truth[:, :, bad])
    assert _rmse(written, truth[:, :, bad]) < _rmse(interpolate_slices(damaged.array, bad, "linear")[:, :, bad], truth[:, :, bad])


def test_scored_body_in_chunks_equals_the_whole_volumes_body():
    """The gate finds the body a few slices at a time (no full-volume mask beside the scan); the
    3D opening reads two slices on each side, so the chunks must give the whole volume's answer."""
    from medinpaint.body import body_mask
    from medinpaint.inpaint.gate import scored_body

    scan = medinpaint.load(shared("ct_abdomen_dicom")).array[::4, ::4, :]
    scan = scan.copy()
    scan[20:40, 20:40, 7] = -1000.0  # a hole in one slice that the opening sees from its neighbours
    whole = body_mask(scan, -500.0, slice_axis=2, largest_only=False, opening=True)
    hidden = [0, 3, 4, 7, 8, 19]
    for chunk in (1, 3, 5, 32):
        body, data_range = scored_body(scan, "CT", hidden, chunk=chunk)
        np.testing.assert_array_equal(body, whole[:, :, hidden])
        assert data_range == pytest.approx(float(np.ptp(scan[whole])))


def test_one_pick_is_bounded_over_its_plane_and_never_writes_the_network():
    """14 acquired slices of an unseen head CT, runs of 3 missing at 2-4 and 8-10: one pick fits. Its
    blocks must show registered beating cubic (it does on the real gaps too), where a fixed default
    wrote cubic, the worst fill there; the network is scored but not written on one pick."""
    volume = medinpaint.load(shared("ct_head_ge_variable_spacing"))
    made = set(volume.resampled_slices) | set(volume.placeholder_slices)
    assert not made & set(range(14))  # slices 0-13 are as acquired
    truth = volume.array[128:384, 128:384, :14].astype(np.float32)
    bad = [2, 3, 4, 8, 9, 10]
    damaged, artifacts = _damaged(truth, volume.affine, bad)
    result = medinpaint.correct(damaged, artifacts, settings=QUICK, device="cpu")
    gate = result.parameters["slice_gate"]
    assert gate["pick_count"] == 1 and "blocks of the one pick" in gate["rule"]
    assert gate["choice"] == "registered" and "network vs registered" in gate["comparisons"]
    written = result.volume.array[:, :, bad]
    for method in ("linear", "cubic"):
        assert _rmse(written, truth[:, :, bad]) < _rmse(interpolate_slices(damaged.array, bad, method)[:, :, bad], truth[:, :, bad])


def test_in_plane_patches_thicken_an_in_plane_axis_into_the_slice_axis():
    """A ramp along i seen through an in-plane patch: its slice axis steps by the thickness (mean of 7
    pixels per slice), its other axes are flat; a hidden plane is read as given, never from the scan."""
    from medinpaint.training.in_plane import in_plane_patch

    ramp = np.arange(200, dtype=np.float32)[:, None, None] * np.ones((200, 150, 12), np.float32)
    patch = in_plane_patch(ramp, {}, np.array([100, 75]), (48, 48, 16), 7.2, 0, np.random.RandomState(0))
    assert patch.shape == (48, 48, 16)
    np.testing.assert_allclose(patch[0, 0], 44 + 3 + 7 * np.arange(16))  # rows 44..155 averaged in sevens
    assert float(patch.std(axis=(0, 1)).max()) < 1e-3
    ramp_j = np.moveaxis(ramp, 0, 1)[:150, :200]
    patch_j = in_plane_patch(np.ascontiguousarray(ramp_j), {}, np.array([75, 100]), (48, 48, 16), 7.2, 1, np.random.RandomState(0))
    np.testing.assert_allclose(patch_j, patch)
    poisoned = {k: np.full(ramp.shape[:2], 1e6, np.float32) for k in range(12)}  # every plane left out: only these are read
    assert in_plane_patch(ramp, poisoned, np.array([100, 75]), (48, 48, 16), 7.2, 0, np.random.RandomState(0)).min() > 1e5
    assert in_plane_patch(ramp[:100], {}, np.array([50, 75]), (48, 48, 16), 7.2, 0, np.random.RandomState(0)) is None


def test_adaptation_cuts_in_plane_patches_only_from_thick_slices():
    volume = medinpaint.load(shared("mr_brain_t1.nrrd"))  # 0.78 x 0.78 x 6.5 mm
    truth = volume.array[64:192, 64:192, :].astype(np.float32)
    damaged, artifacts = _damaged(truth, volume.affine, [11, 12])
    settings = replace(QUICK, adapt=replace(QUICK.adapt, patches=4, seconds=1e6, in_plane=1.0), gate=replace(QUICK.gate, enabled=False))
    result = medinpaint.correct(damaged, artifacts, settings=settings, adapt=5, device="cpu")
    assert result.parameters["slice_gate"]["adaptation"]["in_plane_patches"] == 4
    thin = replace(settings, adapt=replace(settings.adapt, in_plane_min_ratio=10.0))  # 6.5 / 0.78 = 8.3: not thick enough
    result = medinpaint.correct(damaged, artifacts, settings=thin, adapt=5, device="cpu")
    assert result.parameters["slice_gate"]["adaptation"]["in_plane_patches"] == "none (slices not thick enough)"
    with pytest.raises(MedinpaintError, match="adapt.in_plane 1.5"):
        medinpaint.correct(damaged, artifacts, settings=replace(settings, adapt=replace(settings.adapt, in_plane=1.5)), adapt=5, device="cpu")


def test_adaptation_patches_hold_the_real_gaps_as_holes_never_as_targets():
    """A real gap inside a training patch is missing from the input (masked, pre-filled from its
    neighbours, as at inference), never read and never learnt; the hidden slice is learnt."""
    from medinpaint.inpaint.adapt import training_channels

    image = np.random.default_rng(0).normal(size=(16, 16, 10)).astype(np.float32)
    image[:, :, 6] = 1e3  # a real gap's content: must reach no input
    target, prefilled, mask, registered, learnt_from = training_channels(image, [3], [6], "linear", True)
    np.testing.assert_array_equal(target, image)
    assert mask[:, :, [3, 6]].min() == 1 and mask.sum() == 2 * 16 * 16
    assert learnt_from[:, :, 3].min() == 1 and learnt_from.sum() == 16 * 16
    np.testing.assert_allclose(prefilled[:, :, 6], (image[:, :, 5] + image[:, :, 7]) / 2, rtol=1e-6)
    assert np.abs(prefilled).max() < 100 and np.abs(registered).max() < 100
