"""The CUDA path (mixed precision, windows batched from free memory) fills as the CPU does.

Skipped without a CUDA device (CI has none): run `pytest tests/test_gpu.py` on a GPU machine.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import medinpaint
from medinpaint.config import InferenceSettings
from medinpaint.inpaint.inference import network_fill
from medinpaint.inpaint.models import DEFAULT_METAL_MODEL, load_model

from conftest import shared

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _fill_on(device: str, array, holes, slices, model_name, **kwargs):
    model, info = load_model(model_name, torch.device(device))
    run_info: dict = {}
    filled = network_fill(array, holes, slices, "CT", model, InferenceSettings(), torch.device(device),
                          slice_prefill=info.slice_prefill, run_info=run_info, **kwargs)
    return filled, run_info


def test_cuda_fills_missing_slices_as_the_cpu_does():
    array = np.nan_to_num(medinpaint.load(shared("ct_abdomen_3mm.nii.gz")).array, nan=-1024.0).astype(np.float32)
    slices = [40, 41, 42, 70]
    holes = np.zeros(array.shape, bool)
    holes[:, :, slices] = True
    cpu, _ = _fill_on("cpu", array, holes, slices, "medinpaint-slices-v2")
    gpu, run_info = _fill_on("cuda", array, holes, slices, "medinpaint-slices-v2")
    assert np.array_equal(gpu[~holes], array[~holes])  # acquired voxels untouched on the GPU too
    diff = np.abs(gpu[holes] - cpu[holes])
    assert diff.mean() < 2.0 and np.percentile(diff, 99.9) < 25.0, (diff.mean(), diff.max())  # HU; mixed precision
    assert np.abs(gpu[holes] - array[holes]).mean() < np.abs(cpu[holes] - array[holes]).mean() + 0.5
    assert run_info["sw_batch_size"] > 1, run_info  # windows batched from free GPU memory (one at a time on the CPU)


def test_cuda_refines_metal_streaks_as_the_cpu_does():
    array = np.nan_to_num(medinpaint.load(shared("ct_abdomen_3mm.nii.gz")).array, nan=-1024.0).astype(np.float32)
    holes = np.zeros(array.shape, bool)
    holes[30:80, 30:70, 50:60] = True  # a streak region, pre-filled (here: as acquired) and refined
    cpu, _ = _fill_on("cpu", array, holes, [], DEFAULT_METAL_MODEL, holes_prefilled=True, original=array)
    gpu, _ = _fill_on("cuda", array, holes, [], DEFAULT_METAL_MODEL, holes_prefilled=True, original=array)
    assert np.array_equal(gpu[~holes], array[~holes])
    diff = np.abs(gpu[holes] - cpu[holes])
    assert diff.mean() < 2.0 and np.percentile(diff, 99.9) < 25.0, (diff.mean(), diff.max())
