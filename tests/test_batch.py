"""Dataset mode: failures recorded, resume after a finished or a killed run, shards, torchrun."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time

import numpy as np

import medinpaint
from medinpaint.data.save import write_file

from conftest import REPO, SAMPLE, files_under, shared


def _dataset(root, n_nifti=1):
    root.mkdir()
    for i in range(n_nifti):
        (root / f"ct_{i}.nii.gz").write_bytes((SAMPLE / "ct_abdomen_3mm_damaged.nii.gz").read_bytes())
    return root


def _summary(out):
    with open(out / "summary.csv", newline="") as fh:
        return {row["case"]: row for row in csv.DictReader(fh)}


def test_mixed_folder_two_corrected_one_failure_then_resume(cli, tmp_path):
    data = _dataset(tmp_path / "in")
    series = data / "patient" / "series"
    series.parent.mkdir()
    subprocess.run(["cp", "-r", str(shared("io_edge_cases/failing_sliceincrement_002")), str(series)], check=True)
    (data / "corrupt.nii.gz").write_bytes((SAMPLE / "ct_abdomen_3mm.nii.gz").read_bytes()[:50_000])
    out = tmp_path / "out"

    code, _, err = cli("--quiet", "batch", data, out, "--method", "classical", "--report")
    assert code == 3, err
    rows = _summary(out)
    assert {k: r["status"] for k, r in rows.items()} == {"corrupt": "failed", "ct_0": "done", "patient__series": "done"}
    assert "truncated" in rows["corrupt"]["reason"] or "cannot read" in rows["corrupt"]["reason"]
    assert rows["patient__series"]["artifacts"] == "missing_slice:262144"
    assert float(rows["ct_0"]["synthesized_fraction"]) > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"done": 2, "skipped": 0, "failed": 1}
    for case in ("ct_0", "patient__series"):
        fixed = medinpaint.load(out / f"{case}.nii.gz")
        assert json.loads((out / f"{case}.json").read_text())["SynthesizedVoxels"]["count"] > 0
        assert np.isfinite(fixed.array).all()
    assert (out / "report" / "ct_0.html").stat().st_size > 10_000
    assert "ct_0.html" in (out / "report" / "index.html").read_text()

    stamp = (out / "ct_0.nii.gz").stat().st_mtime_ns
    code, _, _ = cli("--quiet", "batch", data, out, "--method", "classical")
    assert code == 3
    rows = _summary(out)
    assert rows["ct_0"]["status"] == rows["patient__series"]["status"] == "skipped"
    assert (out / "ct_0.nii.gz").stat().st_mtime_ns == stamp

    # A changed input is not "done": its hash no longer matches the provenance.
    volume = medinpaint.load(data / "ct_0.nii.gz")
    write_file(volume.with_array(volume.array + 1), data / "ct_0.nii.gz", "nifti", "int32")
    cli("--quiet", "batch", data, out, "--method", "classical")
    assert _summary(out)["ct_0"]["status"] == "done"


def test_killed_run_leaves_valid_outputs_and_resumes(tmp_path):
    data = _dataset(tmp_path / "in", n_nifti=8)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "medinpaint", "--quiet", "batch", str(data), str(out), "--method", "classical"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not (out.exists() and list(out.glob("ct_*.json"))):
        time.sleep(0.02)  # kill as soon as the first case is complete: the rest are mid-flight
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "summary.csv").exists(), "the run finished before it could be killed"
    finished = sorted(p.name[:-5] for p in out.glob("ct_*.json"))
    assert 1 <= len(finished) < 8
    for name in files_under(out):  # every visible output is complete and readable
        if not name.startswith(".") and name.endswith(".nii.gz"):
            medinpaint.load(out / name)

    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rows = _summary(out)
    assert len(rows) == 8
    assert sorted(k for k, r in rows.items() if r["status"] == "skipped") == finished
    assert all(r["status"] in ("done", "skipped") for r in rows.values())
    assert not [n for n in files_under(out) if ".partial-" in n]


def test_two_shards_cover_every_case_once(cli, tmp_path):
    data = _dataset(tmp_path / "in", n_nifti=5)
    out = tmp_path / "out"
    assert cli("--quiet", "batch", data, out, "--method", "classical", "--shard", "0/2")[0] == 0
    assert not (out / "summary.csv").exists()  # only half the cases are done
    assert cli("--quiet", "batch", data, out, "--method", "classical", "--shard", "1/2")[0] == 0
    first = json.loads((out / "summary-shard-0-of-2.json").read_text())["cases"]
    second = json.loads((out / "summary-shard-1-of-2.json").read_text())["cases"]
    a, b = {r["case"] for r in first}, {r["case"] for r in second}
    assert not a & b and a | b == {f"ct_{i}" for i in range(5)}
    assert {k: r["status"] for k, r in _summary(out).items()} == {f"ct_{i}": "done" for i in range(5)}


def test_torchrun_ranks_split_the_cases(tmp_path):
    data = _dataset(tmp_path / "in", n_nifti=4)
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "medinpaint.cli.main", "--quiet", "batch", str(data), str(out), "--method", "classical"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    ranks = [{r["case"] for r in json.loads((out / f"summary-shard-{i}-of-2.json").read_text())["cases"]} for i in range(2)]
    assert ranks[0] and ranks[1] and not ranks[0] & ranks[1]
    assert set(_summary(out)) == ranks[0] | ranks[1] == {f"ct_{i}" for i in range(4)}


def test_csv_manifest_and_bad_shard(cli, tmp_path):
    data = _dataset(tmp_path / "in", n_nifti=2)
    manifest = tmp_path / "cases.csv"
    manifest.write_text("id,path\nfirst,in/ct_1.nii.gz\n")
    out = tmp_path / "out"
    assert cli("--quiet", "batch", manifest, out, "--method", "classical")[0] == 0
    assert set(_summary(out)) == {"first"} and (out / "first.nii.gz").exists()
    code, _, err = cli("batch", data, out, "--shard", "2/2")
    assert code == 2 and err.startswith("error: --shard")


def test_qa_picture_cuts_through_the_synthesized_region():
    from medinpaint.report import _busiest_cut

    mask = np.zeros((40, 30, 50), bool)
    mask[:, :, [5, 20, 44]] = True  # whole slices: axial cut on one of them, nearest the middle
    assert _busiest_cut(mask, 2) == 20
    assert _busiest_cut(mask, 0) == 20 and _busiest_cut(mask, 1) == 15  # uniform: the middle
    mask[:] = False
    mask[3:6, 7:9, 30:33] = True
    assert _busiest_cut(mask, 0) in (3, 4, 5) and _busiest_cut(mask, 1) in (7, 8) and _busiest_cut(mask, 2) in (30, 31, 32)


def _small_cases(root, n):
    from test_provenance import small_ct

    root.mkdir()
    return [small_ct(root, f"case_{i}.nii.gz", k0=40 + 4 * i, blank=8, shape=(64, 64, 16)) for i in range(n)]


def _config(path, **inference):
    """Quick network settings (one 64x64x16 window, no gate) with ``inference`` overrides."""
    values = {"roi_size": [64, 64, 16], "threads": 1} | inference
    path.write_text("gate:\n  enabled: false\ninference:\n" + "".join(f"  {k}: {v}\n" for k, v in values.items()))
    return path


def test_resume_redoes_a_case_whose_settings_changed_and_says_why(cli, tmp_path):
    data = tmp_path / "in"
    _small_cases(data, 1)
    out = tmp_path / "out"
    quick = _config(tmp_path / "quick.yaml")

    def run(*extra):
        code, _, err = cli("--quiet", "batch", data, out, *extra)
        assert code == 0, err
        return _summary(out)["case_0"]

    first = run("--method", "classical")
    assert first["status"] == "done" and first["reason"] == ""
    assert json.loads((out / "case_0.json").read_text())["Run"]["Settings"]["method"] == "classical"
    second = run("--method", "network", "--config", quick)
    assert second["status"] == "done" and second["reason"] == "redone: method changed (classical -> network)"
    provenance = json.loads((out / "case_0.json").read_text())
    assert provenance["Method"] == "network" and provenance["Run"]["Settings"]["models"]["slices"]["Name"] == provenance["Model"]["Name"]
    third = run("--method", "network", "--config", quick)
    assert third["status"] == "skipped"
    fourth = run("--method", "network", "--config", _config(tmp_path / "overlap.yaml", overlap=0.5))
    assert fourth["status"] == "done" and fourth["reason"] == "redone: settings changed (inference.overlap)"
    fifth = run("--method", "network", "--config", quick, "--model", "medinpaint-slices-v2")
    assert fifth["reason"].startswith("redone: model changed (slices: ") and fifth["reason"].endswith("-> medinpaint-slices-v2)")


def test_a_shard_starting_keeps_the_staging_files_of_a_shard_still_running(cli, tmp_path):
    import socket

    data = tmp_path / "in"
    _small_cases(data, 2)
    out = tmp_path / "out"
    out.mkdir()
    host = socket.gethostname().replace("-", "_")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # shard 1/2, still writing
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    try:
        live = out / f".case_1.nii.gz.partial-{other.pid}@{host}+1of2-abcd1234.nii.gz"
        dead = out / f".case_1.json.partial-{gone.pid}@{host}+1of2-abcd1234.json"
        live.write_bytes(b"half a volume")
        dead.write_bytes(b"{")
        assert cli("--quiet", "batch", data, out, "--method", "classical", "--shard", "0/2")[0] == 0
        assert live.read_bytes() == b"half a volume"  # the running shard's file is untouched
        assert not dead.exists()  # a dead process's leftover is gone
        assert (out / "case_0.nii.gz").exists() and not (out / "case_1.nii.gz").exists()
    finally:
        other.kill()
        other.wait()


def test_engine_ray_without_ray_is_one_line(cli, tmp_path, monkeypatch):
    import medinpaint.engines as engines

    data = tmp_path / "in"
    data.mkdir()
    real = engines.importlib.util.find_spec
    monkeypatch.setattr(engines.importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    code, out, err = cli("batch", data, tmp_path / "out", "--engine", "ray")
    assert (code, out, err) == (2, "", "error: --engine ray needs Ray: pip install 'medinpaint[ray]'\n")
    assert not (tmp_path / "out").exists()
    code, _, err = cli("batch", data, tmp_path / "out", "--address", "auto")
    assert code == 2 and err == "error: --address needs --engine ray\n"


def test_batch_slice_spacing_sets_the_dicom_grid_and_a_changed_grid_is_redone(cli, tmp_path):
    """--slice-spacing reaches DICOM cases (the GE series' 8 mm grid has 19 positions), leaves NIfTI cases on
    their own grid, and is part of the run's settings, so dropping it redoes the DICOM case."""
    data = tmp_path / "in"
    _small_cases(data, 1)
    subprocess.run(["cp", "-r", str(shared("ct_head_ge_variable_spacing")), str(data / "ge")], check=True)
    out = tmp_path / "out"
    code, _, err = cli("--quiet", "batch", data, out, "--method", "classical", "--slice-spacing", "8")
    assert code == 0, err
    rows = _summary(out)
    assert {r["status"] for r in rows.values()} == {"done"}
    ge = json.loads((out / "ge.json").read_text())
    assert ge["Geometry"]["shape"][2] == 19 and ge["Run"]["Settings"]["slice_spacing"] == 8.0
    code, _, err = cli("--quiet", "batch", data, out, "--method", "classical")
    assert code == 0, err
    rows = _summary(out)
    assert rows["ge"]["status"] == "done" and "slice_spacing" in rows["ge"]["reason"]
    assert json.loads((out / "ge.json").read_text())["Geometry"]["shape"][2] == 37
