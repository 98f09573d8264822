"""What the provenance records (user mask, detection thresholds, every model, the run's settings) and how outputs reach the disk."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import medinpaint
from medinpaint.batch import clean_partials
from medinpaint.config import Settings
from medinpaint.data import atomic
from medinpaint.data.atomic import StagedOutputs
from medinpaint.data.save import write_file
from medinpaint.hashing import sha256_file
from medinpaint.inpaint.models import DEFAULT_METAL_MODEL, DEFAULT_MODEL
from medinpaint.provenance import run_block, run_settings, run_signature, why_redo

from conftest import files_under, shared


def small_ct(folder, name="case.nii.gz", k0=40, blank=8, shape=(64, 64, 16), ij=(30, 20)):
    """A crop of the real 3 mm CT (in-plane from voxel ``ij``, slices from ``k0``) with slice ``blank`` blanked."""
    volume = medinpaint.load(shared("ct_abdomen_3mm.nii.gz")).slab(k0, k0 + shape[2])
    affine = volume.affine.copy()
    affine[:3, 3] += volume.affine[:3, :3] @ np.array([float(ij[0]), float(ij[1]), 0.0])
    array = volume.array[ij[0]:ij[0] + shape[0], ij[1]:ij[1] + shape[1]].copy()
    if blank is not None:
        array[:, :, blank] = array.min()
    path = folder / name
    write_file(medinpaint.Volume(array, affine, modality="CT"), path, "nifti", "int32")
    return path


# --- C. fsync before rename ---------------------------------------------------------------------------------------

def test_commit_fsyncs_every_file_before_its_rename_then_the_folder(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd)))
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (events.append(("replace", str(a))), real_replace(a, b)))
    with StagedOutputs() as staged:
        staged.path_for(tmp_path / "volume.nii").write_bytes(b"v" * 1000)
        folder = staged.path_for(tmp_path / "series", is_dir=True)
        (folder / "IM1.dcm").write_bytes(b"1")
        (folder / "sub").mkdir()
        (folder / "sub" / "IM2.dcm").write_bytes(b"2")
        staged.path_for(tmp_path / "provenance.json").write_text("{}")
    renames = [path for kind, path in events if kind == "replace"]
    assert [p.rsplit("/", 1)[1].split(".partial-")[0] for p in renames] == [".volume.nii", ".series", ".provenance.json"]
    for tmp in renames:
        synced = [i for i, (kind, path) in enumerate(events) if kind == "fsync" and path.startswith(tmp)]
        renamed = events.index(("replace", tmp))
        expected = 1 if not tmp.rsplit("/", 1)[1].startswith(".series") else 4  # its 2 files, then sub/ and itself
        assert len(synced) == expected and max(synced) < renamed, (tmp, events)
        assert ("fsync", str(tmp_path)) in events[renamed:], "the folder holding the new name is synced after the rename"
    assert (tmp_path / "series" / "sub" / "IM2.dcm").read_bytes() == b"2"


def test_save_renames_the_provenance_last(tmp_path, monkeypatch):
    path = small_ct(tmp_path)
    volume = medinpaint.load(path)
    result = medinpaint.correct(volume, medinpaint.find_artifacts(volume, artifacts="slices"), method="classical")
    renamed = []
    real_replace = os.replace
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (renamed.append(os.path.basename(b)), real_replace(a, b)))
    (tmp_path / "out").mkdir()
    medinpaint.save(result, tmp_path / "out" / "fixed.nii.gz")
    assert renamed == ["fixed.nii.gz", "fixed_desc-synthesized_mask.nii.gz", "fixed.json"]


# --- B. staging names carry their owner; clean-up removes only provably stale leftovers -----------------------------

def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_clean_up_of_one_shard_keeps_a_live_shards_files(tmp_path):
    host = socket.gethostname().replace("-", "_")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            "live_other_shard": f".a.nii.gz.partial-{live.pid}@{host}+1of2-x1y2z3ab.nii.gz",  # shard 1 is still writing
            "dead_other_shard": f".b.nii.gz.partial-{_dead_pid()}@{host}+1of2-x1y2z3ab.nii.gz",  # its process is gone
            "other_host": f".c.nii.gz.partial-{live.pid}@elsewhere.node7+1of2-x1y2z3ab.nii.gz",  # cannot be checked
            "my_shard_elsewhere": f".d.nii.gz.partial-{live.pid}@elsewhere.node7+0of2-x1y2z3ab.nii.gz",  # an earlier run of 0/2
            "no_owner": ".e.nii.gz.partial-x1y2z3ab.nii.gz",  # from before owners were recorded: kept
            "dead_dicom_aside": f".f.old-{_dead_pid()}@{host}+1of2",
        }
        for name in names.values():
            (tmp_path / name).write_bytes(b"partial")
        (tmp_path / names["dead_dicom_aside"]).unlink()
        (tmp_path / names["dead_dicom_aside"]).mkdir()
        atomic.set_shard_tag("0of2")
        try:
            assert clean_partials(tmp_path) == 3
        finally:
            atomic.set_shard_tag("")
        left = set(files_under(tmp_path))
        assert left == {names["live_other_shard"], names["other_host"], names["no_owner"]}
    finally:
        live.kill()
        live.wait()


def test_staged_names_carry_pid_host_and_shard(tmp_path):
    atomic.set_shard_tag("3of4")
    try:
        with StagedOutputs() as staged:
            tmp = staged.path_for(tmp_path / "x.nii.gz")
            owner = atomic.staging_owner(tmp.name)
            staged.discard()
    finally:
        atomic.set_shard_tag("")
    assert owner == {"pid": os.getpid(), "host": socket.gethostname().replace("-", "_"), "shard": "3of4"}
    assert tmp.name.endswith(".nii.gz")  # writers still see the format


# --- A. the run record and why a finished case is redone ----------------------------------------------------------

def test_run_record_says_what_changed(tmp_path):
    settings = Settings()
    classical = run_settings(method="classical", settings=settings, output_format="nifti")
    network = run_settings(method="network", settings=settings, output_format="nifti")
    assert network["models"]["slices"]["Name"] == DEFAULT_MODEL and "metal" not in network["models"]  # metal.refine: classical
    refined = dataclasses.replace(settings, metal=dataclasses.replace(settings.metal, refine="network"))
    for record in (run_settings(method="network", settings=refined, output_format="nifti"),
                   run_settings(method="network", settings=settings, output_format="nifti", metal_model=DEFAULT_METAL_MODEL)):
        assert record["models"]["metal"]["Name"] == DEFAULT_METAL_MODEL  # what this run would use, before any case
    assert len(network["models"]["slices"]["SHA256"]) == 64 and classical["models"] == {}
    previous = {"Sources": [{"SHA256": "abc"}], "Run": json.loads(json.dumps(run_block(classical)))}  # as read back
    assert why_redo(previous, "abc", classical) is None
    assert why_redo(previous, "abd", classical) == "redone: input changed"
    assert why_redo(previous, "abc", network) == "redone: method changed (classical -> network)"
    previous["Run"] = json.loads(json.dumps(run_block(network)))
    other_model = run_settings(method="network", settings=settings, output_format="nifti", model="medinpaint-slices-v2")
    assert why_redo(previous, "abc", other_model) == f"redone: model changed (slices: {DEFAULT_MODEL} -> medinpaint-slices-v2)"
    overlap = dataclasses.replace(settings, inference=dataclasses.replace(settings.inference, overlap=0.5))
    assert why_redo(previous, "abc", run_settings(method="network", settings=overlap, output_format="nifti")) \
        == "redone: settings changed (inference.overlap)"
    assert why_redo(previous, "abc", run_settings(method="network", settings=settings, output_format="nrrd")) \
        == "redone: settings changed (output_format)"
    threads = dataclasses.replace(settings, inference=dataclasses.replace(settings.inference, threads=1))
    assert why_redo(previous, "abc", run_settings(method="network", settings=threads, output_format="nifti")) is None
    assert why_redo({"Sources": [{"SHA256": "abc"}]}, "abc", network) == "redone: the previous output records no run settings"

    # The user mask counts by its bytes, not where it lies; a mask replaces detection (no thresholds, no metal model).
    mask = tmp_path / "m.nii.gz"
    mask.write_bytes(b"one")
    moved = tmp_path / "moved.nii.gz"
    moved.write_bytes(b"one")
    with_mask = run_settings(method="network", settings=settings, output_format="nifti", user_mask=mask)
    assert with_mask["mask"] == {"Path": str(mask), "SHA256": sha256_file(mask)}
    assert with_mask["detection"] == {} and set(with_mask["models"]) == {"slices"}
    assert run_signature(with_mask) == run_signature(run_settings(method="network", settings=settings, output_format="nifti", user_mask=moved))
    moved.write_bytes(b"two")
    changed = run_settings(method="network", settings=settings, output_format="nifti", user_mask=moved)
    assert why_redo({"Sources": [{"SHA256": "abc"}], "Run": run_block(with_mask)}, "abc", changed) \
        == "redone: settings changed (mask.SHA256)"


# --- D. what the provenance of `correct` holds ---------------------------------------------------------------------

def test_correct_records_the_user_mask_and_the_detection_thresholds(cli, tmp_path):
    path = small_ct(tmp_path, blank=None)
    volume = medinpaint.load(path)
    holes = np.zeros(volume.shape, np.uint8)
    holes[20:30, 20:30, 5:8] = 1
    mask = tmp_path / "holes.nii.gz"
    write_file(volume.with_array(holes), mask, "nifti", "uint8")
    code, _, err = cli("--quiet", "correct", path, tmp_path / "a.nii.gz", "--mask", mask, "--method", "classical")
    assert code == 0, err
    record = json.loads((tmp_path / "a.json").read_text())
    assert record["UserMask"] == {"Path": str(mask), "SHA256": sha256_file(mask)}
    assert record["Detection"] == {}  # the mask replaced detection
    assert record["SynthesizedVoxels"]["by_kind"]["user_mask"]["count"] == 300

    code, _, err = cli("--quiet", "correct", path, tmp_path / "b.nii.gz", "--method", "classical", "--artifacts", "slices")
    assert code == 0, err
    record = json.loads((tmp_path / "b.json").read_text())
    assert record["UserMask"] is None
    assert record["Detection"] == {"slices": dataclasses.asdict(Settings().slices)}  # thresholds actually used
    assert record["Run"]["Settings"]["artifacts"] == "slices" and len(record["Run"]["Signature"]) == 64


def test_both_models_are_recorded_when_slices_and_metal_streaks_are_filled(tmp_path):
    """The real hip implant (lowest slices) plus a blanked slice: the slice model and the metal model both run."""
    path = small_ct(tmp_path, k0=10, blank=10, shape=(48, 48, 12), ij=(10, 20))  # the implant: i 15..34, j 30..45, k 0..16
    volume = medinpaint.load(path)
    base = Settings()
    settings = dataclasses.replace(  # small and quick: coarse re-projection, small windows, no gate
        base, gate=dataclasses.replace(base.gate, enabled=False), inference=dataclasses.replace(base.inference, roi_size=(48, 48, 16)),
        metal=dataclasses.replace(base.metal, views=90, channels=90, refine="network"))
    found = medinpaint.find_artifacts(volume, metal_settings=settings.metal)
    assert {"blank_slice", "metal_streak"} <= set(found.counts())
    result = medinpaint.correct(volume, found, settings=settings)
    medinpaint.save(result, tmp_path / "fixed.nii.gz")
    record = json.loads((tmp_path / "fixed.json").read_text())
    assert record["Models"]["slices"]["Name"] == DEFAULT_MODEL
    assert record["Models"]["metal"]["Name"] == DEFAULT_METAL_MODEL
    assert record["Model"]["Name"] == DEFAULT_MODEL  # the old single field is kept for its readers
