"""Inference mechanics: hole grouping, untouched acquired voxels, uncertainty, the shipped model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medinpaint.config import InferenceSettings
from medinpaint.inpaint.inference import hole_boxes, network_fill
from medinpaint.inpaint.models import DEFAULT_MODEL, list_models, load_model, read_info, resolve
from medinpaint.inpaint.network import InpaintingUNet


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


def test_network_output_is_the_input_outside_the_mask():
    torch.manual_seed(0)
    net = InpaintingUNet((8, 8, 16, 16, 32, 8)).eval()
    for p in net.parameters():  # random, non-zero weights everywhere (a trained net has them too)
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(1, 1, 32, 32, 16)
    mask = torch.zeros_like(x)
    mask[..., 10:20, 10:20, 5:9] = 1
    with torch.no_grad():
        y = net(x, mask)
    assert torch.equal(y[mask == 0], x[mask == 0])
    assert not torch.allclose(y[mask > 0], x[mask > 0])


def test_fill_touches_only_holes_and_reports_spread():
    torch.manual_seed(0)
    net = InpaintingUNet((8, 8, 16, 16, 32, 8)).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
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


def test_shipped_default_model_is_trained_and_documented():
    path = resolve(None)
    assert path.name == f"{DEFAULT_MODEL}.safetensors"
    assert path.stat().st_size < 50 * 2**20  # small enough to ship in the package
    info = read_info(path)
    assert info.metadata["steps"] >= 100
    assert info.metadata["validation"]["gain_db"] > 0  # it beats its linear pre-fill on validation
    assert path.with_suffix(".md").exists()
    assert info.sha256 in path.with_suffix(".md").read_text()
    model, _ = load_model(None)
    final = dict(model.named_parameters())
    # Never random or untrained: the zero-initialised output layer has learned weights.
    assert any(p.abs().sum() > 0 for n, p in final.items() if "final" in n)
    assert [m.name for m in list_models()].count(DEFAULT_MODEL) == 1
