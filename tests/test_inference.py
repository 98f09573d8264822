"""Inference mechanics: hole grouping, untouched acquired voxels, uncertainty, the shipped model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medinpaint.config import InferenceSettings
from medinpaint.errors import MedinpaintError
from medinpaint.inpaint.inference import batch_for_memory, hole_boxes, network_fill, sw_batch_size
from medinpaint.inpaint.models import DEFAULT_METAL_MODEL, DEFAULT_MODEL, list_models, load_model, read_info, resolve
from medinpaint.inpaint.classical import interpolate_slices
from medinpaint.inpaint.network import InpaintingUNet
from medinpaint.inpaint.registered import registered_slices
from medinpaint.training.procedural import procedural_volume


def test_hole_boxes_groups_and_merges():
    holes = np.zeros((40, 40, 60), bool)
    holes[:, :, 5] = True
    holes[:, :, 30] = True
    holes[:, :, 33] = True  # close to 30: one group
    holes[10:12, 10:12, 55] = True
    boxes = hole_boxes(holes, [4, 4, 4])
    assert [(b[2].start, b[2].stop) for b in boxes] == [(1, 10), (26, 38), (51, 60)]
    assert boxes[2][0] == slice(6, 16)
    covered = np.zeros_like(holes)
    for b in boxes:
        covered[b] = True
    assert covered[holes].all()


def _random_net(seed: int) -> InpaintingUNet:
    """A small net with random, non-zero weights everywhere (a trained net has them too)."""
    torch.manual_seed(seed)
    net = InpaintingUNet((8, 8, 16, 16, 32, 8)).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return net


def test_network_output_is_the_input_outside_the_mask():
    net = _random_net(0)
    x = torch.randn(1, 1, 32, 32, 16)
    mask = torch.zeros_like(x)
    mask[..., 10:20, 10:20, 5:9] = 1
    with torch.no_grad():
        y = net(x, mask)
    assert torch.equal(y[mask == 0], x[mask == 0])
    assert not torch.allclose(y[mask > 0], x[mask > 0])


def test_fill_touches_only_holes_and_reports_spread():
    net = _random_net(0)
    rng = np.random.default_rng(0)
    array = rng.normal(0, 100, (70, 60, 50)).astype(np.float32)
    holes = np.zeros(array.shape, bool)
    holes[:, :, [10, 40]] = True
    holes[20:30, 20:30, 20:25] = True
    settings = InferenceSettings(roi_size=(32, 32, 16), sw_batch_size=4)
    filled, spread = network_fill(array, holes, [10, 40], "MR", net, settings, torch.device("cpu"), flip_axes=(0, 1))
    assert np.array_equal(filled[~holes], array[~holes])
    assert np.isfinite(filled).all() and (filled[holes] != array[holes]).mean() > 0.99
    assert (spread[~holes] == 0).all() and spread[holes].mean() > 0


def test_model_reading_the_original_starts_as_its_narrower_parent_and_uses_the_original(tmp_path):
    from medinpaint.inpaint.models import save_model

    narrow = _random_net(0)
    wide = InpaintingUNet(narrow.features, original_input=True).eval()
    wide.load_narrower(narrow.state_dict())
    x, original = torch.randn(1, 1, 32, 32, 16), torch.randn(1, 1, 32, 32, 16)
    mask = torch.zeros_like(x)
    mask[..., 8:24, 8:24, 4:12] = 1
    with torch.no_grad():
        torch.testing.assert_close(wide(x, mask, original), narrow(x, mask))  # the new channel starts at zero weight
        with pytest.raises(ValueError, match="takes a third input"):
            wide(x, mask)
    save_model(wide, tmp_path / "wide.safetensors", task="metal")
    assert read_info(tmp_path / "wide.safetensors").original_input
    loaded, _ = load_model(str(tmp_path / "wide.safetensors"))
    for p in loaded.parameters():  # a trained model: the original channel carries weight
        torch.nn.init.normal_(p, std=0.05)
    array = np.random.default_rng(0).normal(0, 100, (48, 48, 24)).astype(np.float32)
    holes = np.zeros(array.shape, bool)
    holes[10:30, 10:30, 8:14] = True
    settings = InferenceSettings(roi_size=(32, 32, 16))
    fills = [network_fill(array, holes, [], "CT", loaded, settings, torch.device("cpu"), holes_prefilled=True, original=o)
             for o in (array, array + 200)]
    assert np.array_equal(fills[0][~holes], array[~holes])
    assert np.abs(fills[0] - fills[1])[holes].mean() > 0.1  # the fill reads the original (ignored, it would be 0)
    with pytest.raises(MedinpaintError, match="reads the original scan"):
        network_fill(array, holes, [], "CT", loaded, settings, torch.device("cpu"), holes_prefilled=True)


def test_model_reading_registered_slices_starts_as_its_parent_and_uses_them(tmp_path):
    from medinpaint.inpaint.models import save_model

    narrow = _random_net(1)
    wide = InpaintingUNet(narrow.features, registered_input=True).eval()
    wide.load_narrower(narrow.state_dict())
    array = procedural_volume(4, (48, 48, 24), "MR").astype(np.float32)
    holes = np.zeros(array.shape, bool)
    holes[:, :, 10:13] = True
    settings = InferenceSettings(roi_size=(32, 32, 16))
    cpu = torch.device("cpu")
    before = network_fill(array, holes, [10, 11, 12], "MR", narrow, settings, cpu, slice_prefill="linear")
    expected = before.copy()  # the new channel starts at zero weight and the gate at 0.5: half way to registered
    linear = interpolate_slices(array, [10, 11, 12], "linear")
    for k, plane in registered_slices(array, [10, 11, 12]).items():
        expected[:, :, k] += 0.5 * (plane - linear[:, :, k])
    np.testing.assert_allclose(network_fill(array, holes, [10, 11, 12], "MR", wide, settings, cpu, slice_prefill="linear"),
                               expected, atol=1e-3 * np.ptp(array))
    save_model(wide, tmp_path / "wide.safetensors", task="slices")
    assert read_info(tmp_path / "wide.safetensors").registered_input
    loaded, _ = load_model(str(tmp_path / "wide.safetensors"))
    first = next(p for p in loaded.parameters() if p.dim() == 5)
    with torch.no_grad():
        first[:, 2].normal_(std=0.5)  # a trained model: the registered channel carries weight
    after = network_fill(array, holes, [10, 11, 12], "MR", loaded, settings, cpu, slice_prefill="linear")
    assert np.array_equal(after[~holes], array[~holes])
    assert np.abs(after - before)[holes].mean() > 1e-3 * np.abs(array).mean()
    with pytest.raises(ValueError, match="not both"):
        InpaintingUNet(narrow.features, original_input=True, registered_input=True)


@pytest.mark.parametrize("name, task", [(None, "slices"), (DEFAULT_METAL_MODEL, "metal")])
def test_shipped_default_models_are_trained_and_documented(name, task):
    path = resolve(name)
    assert path.name == f"{name or DEFAULT_MODEL}.safetensors"
    assert path.stat().st_size < 50 * 2**20  # small enough to ship in the package
    info = read_info(path)
    assert info.task == task
    assert info.original_input == (task == "metal")  # the metal default also reads the damaged scan
    assert info.registered_input == (task == "slices")  # the slices default also reads registered interpolation
    assert info.metadata["steps"] >= 100
    assert info.metadata["validation"]["gain_db"] > 0  # it beats its pre-fill (interpolation or NMAR) on validation
    assert path.with_suffix(".md").exists()
    assert info.sha256 in path.with_suffix(".md").read_text()
    model, _ = load_model(name)
    final = dict(model.named_parameters())
    # Never random or untrained: the zero-initialised output layer has learned weights.
    assert any(p.abs().sum() > 0 for n, p in final.items() if "final" in n)
    assert [m.name for m in list_models()].count(name or DEFAULT_MODEL) == 1


class _RunsOutOfMemory(torch.nn.Module):
    """Wraps a network and fails like a full GPU whenever more than ``limit`` windows come at once."""

    def __init__(self, net: torch.nn.Module, limit: int):
        super().__init__()
        self.net, self.limit, self.batches = net, limit, []

    def forward(self, image, mask):
        self.batches.append(image.shape[0])
        if image.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.net(image, mask)


def test_out_of_memory_retries_with_fewer_windows_and_gives_the_same_fill():
    torch.manual_seed(0)
    net = InpaintingUNet((8, 8, 16, 16, 32, 8)).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    array = np.random.default_rng(1).normal(0, 100, (64, 64, 40)).astype(np.float32)
    holes = np.zeros(array.shape, bool)
    holes[:, :, 20] = True
    small = InferenceSettings(roi_size=(32, 32, 16), sw_batch_size=1)
    expected = network_fill(array, holes, [20], "MR", net, small, torch.device("cpu"))
    flaky = _RunsOutOfMemory(net, limit=1)
    used: dict = {}
    filled = network_fill(array, holes, [20], "MR", flaky, InferenceSettings(roi_size=(32, 32, 16), sw_batch_size=4),
                          torch.device("cpu"), run_info=used)
    assert used["sw_batch_size"] == 1 and flaky.batches[:2] == [4, 2]
    np.testing.assert_allclose(filled, expected, atol=1e-5)
    with pytest.raises(MedinpaintError, match="out of GPU memory even with one window"):
        network_fill(array, holes, [20], "MR", _RunsOutOfMemory(net, limit=0), small, torch.device("cpu"))


def test_batch_size_from_free_memory():
    roi = (96, 96, 32)
    assert sw_batch_size(3, torch.device("cpu"), roi) == 3
    assert sw_batch_size("auto", torch.device("cpu"), roi) == 1
    assert batch_for_memory(10 * 2**20, roi) == 1  # never zero
    assert batch_for_memory(2 * 2**30, roi) < batch_for_memory(8 * 2**30, roi) <= batch_for_memory(80 * 2**30, roi) == 16
    with pytest.raises(MedinpaintError, match="sw_batch_size"):
        sw_batch_size(0, torch.device("cpu"), roi)


def test_kept_slices_and_reused_registration_give_the_full_fill_of_those_slices():
    """The gate scores a few slices: keep_slices returns just them (no copy of the scan), skips crops
    without one, and reused registered planes change nothing."""
    net = InpaintingUNet(_random_net(2).features, registered_input=True).eval()
    array = procedural_volume(5, (48, 48, 64), "CT").astype(np.float32)
    bad = [10, 11, 40, 58]  # two far apart groups: the crop around 40 is not run for slices 10 and 11
    holes = np.zeros(array.shape, bool)
    holes[:, :, bad] = True
    holes[5:9, 5:9, 30] = True  # a hole that is not a whole slice, in no kept crop
    settings = InferenceSettings(roi_size=(32, 32, 16), context_voxels=4)
    cpu = torch.device("cpu")
    full = network_fill(array, holes, bad, "CT", net, settings, cpu, slice_prefill="linear")
    kept = network_fill(array, holes, bad, "CT", net, settings, cpu, slice_prefill="linear", keep_slices=[10, 11])
    assert kept.shape == (48, 48, 2)
    np.testing.assert_array_equal(kept, full[:, :, [10, 11]])
    planes = registered_slices(array, bad, wanted=[10])
    assert sorted(planes) == [10, 11]  # the whole gap holding the wanted slice, no other gap
    reused = network_fill(array, holes, bad, "CT", net, settings, cpu, slice_prefill="linear", keep_slices=[10, 11],
                          registered_planes={k: p + 100.0 for k, p in planes.items()})
    assert not np.array_equal(reused, kept)  # the planes given are the ones read
    with pytest.raises(MedinpaintError, match="keep_slices"):
        network_fill(array, holes, bad, "CT", net, settings, cpu, keep_slices=[10], flip_axes=(0,))


def test_kept_slices_get_one_crop_per_run_never_merged():
    """Picks a few slices apart each get their own crop (merged, the crops of 16 picks grew to a
    hundred full slices: the gate's peak memory)."""
    from medinpaint.inpaint.inference import kept_boxes

    holes = np.zeros((40, 40, 60), bool)
    holes[:, :, [10, 11, 20, 30]] = True
    holes[3:6, 4:9, 40] = True
    boxes, owned = kept_boxes(holes, [10, 11, 20, 40], [8, 8, 16])
    assert owned == [[10, 11], [20], [40]]
    assert [(b[2].start, b[2].stop) for b in boxes] == [(0, 28), (4, 37), (24, 57)]
    assert (boxes[2][0], boxes[2][1]) == (slice(0, 14), slice(0, 17))
