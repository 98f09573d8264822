"""The MONAI bundle (configs/bundle): it states the shipped models truthfully and writes what `medinpaint correct` writes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.inferers import SimpleInferer, SlidingWindowInferer

from medinpaint.bundle import load_weights, run_cases, settings_with
from medinpaint.config import Settings, load_settings
from medinpaint.errors import MedinpaintError
from medinpaint.inpaint.models import DEFAULT_METAL_MODEL, DEFAULT_MODEL
from medinpaint.inpaint.network import InpaintingUNet
from medinpaint.inpaint.normalize import CT_RANGE, Normalizer

from conftest import REPO, shared

BUNDLE = REPO / "configs" / "bundle"
META = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
TASKS = {"slices": ("network_def", "model"), "metal": ("metal_network_def", "metal_model")}


def _parser() -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(BUNDLE / "configs" / "inference.json")
    return parser


def _bundle_run(input_dir, output_dir, *extra) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--bundle_root", "configs/bundle",
         "--config_file", "configs/bundle/configs/inference.json", "--meta_file", "configs/bundle/configs/metadata.json",
         "--input_dir", str(input_dir), "--output_dir", str(output_dir), *map(str, extra)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )


def test_standard_layout_and_version():
    for path in ("configs/metadata.json", "configs/inference.json", "docs/README.md", "LICENSE"):
        assert (BUNDLE / path).is_file(), path
    assert not (BUNDLE / "inference.json").exists() and not (BUNDLE / "metadata.json").exists()
    assert "Apache License" in (BUNDLE / "LICENSE").read_text()
    assert META["version"] == "0.2.0" and {"0.2.0", "0.1.0"} <= set(META["changelog"])


def test_metadata_states_the_shipped_default_models():
    parser = _parser()
    assert (parser["model"], parser["metal_model"]) == (DEFAULT_MODEL, DEFAULT_METAL_MODEL)
    shipped = load_settings(REPO / "configs" / "inference.yaml").inference
    inferer = parser.get_parsed_content("inferer")
    assert isinstance(inferer, SlidingWindowInferer)
    assert (list(inferer.roi_size), inferer.overlap, inferer.mode.value) == (list(shipped.roi_size), shipped.overlap, shipped.blend_mode)
    ct_range = Normalizer.for_volume(np.zeros(1), "CT").forward(np.array(CT_RANGE)).tolist()
    formats = {"slices": META["network_data_format"], "metal": META["models"]["metal"]["network_data_format"]}
    for task, (net_id, model_id) in TASKS.items():
        net, info = load_weights(parser.get_parsed_content(net_id), parser[model_id], task)  # strict=True
        entry = META["models"][task]
        assert (entry["name"], entry["sha256"]) == (info.name, info.sha256)
        assert (REPO / entry["weights"]).resolve() == info.path.resolve() and (REPO / entry["card"]).is_file()
        image, pred = formats[task]["inputs"]["image"], formats[task]["outputs"]["pred"]
        assert image["num_channels"] == net.unet.conv_0.conv_0.conv.in_channels == len(image["channel_def"]) == 3
        assert image["spatial_shape"] == pred["spatial_shape"] == list(shipped.roi_size)
        assert image["value_range"] == ct_range == [0.0, 4095 / 1024]
        with torch.no_grad():  # the output channels, on a small patch (instance norm needs 2 voxels at the bottom)
            x = torch.zeros((1, image["num_channels"], 32, 32, 32))
            assert net(x[:, :1], x[:, 1:2], x[:, 2:3]).shape[1] == pred["num_channels"] == 1


def test_a_network_def_inferer_or_option_that_is_not_what_runs_is_refused(tmp_path):
    with pytest.raises(MedinpaintError, match="not the architecture"):
        load_weights(InpaintingUNet(), DEFAULT_MODEL, "slices")  # slices-v3 reads a third (registered) channel
    with pytest.raises(MedinpaintError, match="not a slices model"):
        load_weights(InpaintingUNet(original_input=True), DEFAULT_METAL_MODEL, "slices")
    roi = Settings().inference.roi_size
    with pytest.raises(MedinpaintError, match="sigma_scale"):
        settings_with(SlidingWindowInferer(roi, overlap=0.25, mode="gaussian", sigma_scale=0.3), Settings(), "cpu")
    with pytest.raises(MedinpaintError, match="SlidingWindowInferer"):
        settings_with(SimpleInferer(), Settings(), "cpu")
    used = settings_with(SlidingWindowInferer((64, 64, 32), sw_batch_size=1, overlap=0.5, mode="constant"), Settings(), "cpu")
    assert used.inference.roi_size == (64, 64, 32) and used.inference.overlap == 0.5 and used.inference.blend_mode == "constant"
    assert used.inference.sw_batch_size == "auto"  # 1 is what auto runs on the CPU: recorded as configured
    with pytest.raises(MedinpaintError, match="overwrite must be True or False"):  # fire's reading of `--overwrite false`
        run_cases(tmp_path, tmp_path / "out", networks={}, inferer=SlidingWindowInferer(roi), overwrite="false")
    assert not (tmp_path / "out").exists()


def test_export_writes_the_spec_weights_from_the_network_defs(tmp_path):
    spec = importlib.util.spec_from_file_location("bundle_export", BUNDLE / "scripts" / "export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    root = tmp_path / "bundle"
    (root / "configs").mkdir(parents=True)
    (root / "configs" / "inference.json").write_bytes((BUNDLE / "configs" / "inference.json").read_bytes())
    written = module.export(root)
    assert [p.name for p in written] == ["model.pt", "metal_model.pt"]
    parser = _parser()
    for path, (task, (net_id, model_id)) in zip(written, TASKS.items()):
        exported = torch.load(path, weights_only=True)
        shipped = load_weights(parser.get_parsed_content(net_id), parser[model_id], task)[0].state_dict()
        assert exported.keys() == shipped.keys() and all(torch.equal(exported[k], v) for k, v in shipped.items())


def test_bundle_run_writes_what_correct_writes(tmp_path, cli):
    """Both networks run (the crop holds the hip implant and a blank slice); volume and mask are compared exactly."""
    image = nib.load(shared("ct_abdomen_3mm.nii.gz")).slicer[8:56, 14:62, 0:16]
    array = np.asarray(image.dataobj).copy()
    array[:, :, 12] = array.min()
    data = tmp_path / "in"
    data.mkdir()
    nib.save(nib.Nifti1Image(array, image.affine, image.header), data / "ct.nii.gz")
    # Both runs: the metal model refines the streaks (not the default), so both network_defs run; the slice
    # gate (left-out-slice scoring inside correct()) is off to keep the test short. One thread in both
    # processes: float sums may round differently with another thread count (an HU apart after rounding).
    config = tmp_path / "settings.yaml"
    config.write_text("gate:\n  enabled: false\nmetal:\n  refine: network\ninference:\n  threads: 1\n")

    out = tmp_path / "bundle"
    result = _bundle_run(data, out, "--medinpaint_config", config)
    assert result.returncode == 0, result.stderr[-3000:]
    reference = tmp_path / "reference"
    reference.mkdir()
    assert cli("--quiet", "correct", data / "ct.nii.gz", reference / "ct.nii.gz", "--config", config)[0] == 0

    names = ["ct.nii.gz", "ct_desc-synthesized_mask.nii.gz", "ct.json"]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir()) == sorted(names)
    for name in names[:2]:
        ours, theirs = nib.load(out / name), nib.load(reference / name)
        assert np.array_equal(np.asarray(ours.dataobj), np.asarray(theirs.dataobj)), name  # exactly, not within a tolerance
        assert np.array_equal(ours.affine, theirs.affine)
    provenance = [json.loads((folder / "ct.json").read_text()) for folder in (out, reference)]
    for record in provenance:
        del record["DateTime"], record["Seconds"]
    assert provenance[0] == provenance[1]
    assert set(provenance[0]["Models"]) == {"slices", "metal"}  # the bundle's network_defs both ran
    assert provenance[0]["SynthesizedVoxels"]["by_kind"]["blank_slice"]["count"] == 48 * 48

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = _bundle_run(data, out, "--medinpaint_config", config)  # outputs exist and --overwrite was not given
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert again.stderr.strip().splitlines()[-1].startswith("error: ") and "exists" in again.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
