"""The Ray engine writes what the local engine writes, and resumes by the same rules (a local Ray instance)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import medinpaint
from medinpaint.batch import list_cases, run_batch
from medinpaint.config import load_settings

from test_batch import _config, _small_cases

ray = pytest.importorskip("ray", reason="the Ray engine is optional: pip install 'medinpaint[ray]'")

TIME_FIELDS = ("DateTime", "Seconds")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_engine_matches_the_local_run_and_resumes(local_ray, tmp_path):
    _small_cases(tmp_path / "in", 3)
    cases = list_cases(tmp_path / "in")
    settings = load_settings(_config(tmp_path / "quick.yaml"))  # one torch thread per worker in both engines
    local, remote = tmp_path / "local", tmp_path / "ray"
    common = dict(method="network", settings=settings, workers=2, progress=False)
    expected = run_batch(cases, local, engine="local", **common)
    got = run_batch(cases, remote, engine="ray", **common)
    assert [(r.case, r.status) for r in got] == [(r.case, r.status) for r in expected] == [(f"case_{i}", "done") for i in range(3)]
    assert [r.artifacts for r in got] == [r.artifacts for r in expected] == ["blank_slice:4096"] * 3
    for case in ("case_0", "case_1", "case_2"):
        for suffix in (".nii.gz", "_desc-synthesized_mask.nii.gz"):
            a, b = medinpaint.load(local / f"{case}{suffix}"), medinpaint.load(remote / f"{case}{suffix}")
            assert np.array_equal(a.array, b.array) and np.array_equal(a.affine, b.affine)
        a, b = (json.loads((root / f"{case}.json").read_text()) for root in (local, remote))
        for record in (a, b):
            for key in TIME_FIELDS:
                record.pop(key)
        assert a == b
        assert a["SynthesizedVoxels"]["count"] == 4096 and a["Models"]["slices"]["Name"] == a["Model"]["Name"]

    again = run_batch(cases, remote, engine="ray", **common)
    assert [r.status for r in again] == ["skipped"] * 3
    assert all(r.reason.startswith("complete output") for r in again)
    assert not [p for p in remote.iterdir() if ".partial-" in p.name]
