"""Shared fixtures: the real scans in ../shared/data and an in-process CLI runner."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from medinpaint.cli.main import main

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"
SAMPLE = REPO / "sample_data"


@pytest.fixture(autouse=True)
def _keep_cpu_threads():
    """A test that runs the CLI with `inference.threads` sets torch's and SimpleITK's threads for the process;
    put them back, so no test runs with another's thread count (float sums round differently with it)."""
    import SimpleITK as sitk
    import torch

    torch_threads, sitk_threads = torch.get_num_threads(), sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    yield
    torch.set_num_threads(torch_threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(sitk_threads)


def shared(name: str) -> Path:
    path = DATA / name
    if not path.exists():
        pytest.skip(f"shared test data {path} not present")
    return path


@pytest.fixture
def cli(capsys):
    """Run ``medinpaint ARGS`` in-process; return (exit code, stdout, stderr)."""

    def run(*args: str):
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def blank_slices(array: np.ndarray, count: int, seed: int) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    ks = sorted(rng.choice(np.arange(2, array.shape[2] - 2), size=count, replace=False).tolist())
    damaged = array.copy()
    damaged[:, :, ks] = float(np.nanmin(array))
    return damaged, ks


def enhanced_multiframe(files, path: Path) -> Path:
    """An enhanced (multi-frame) CT made by highdicom from classic slice files, written to ``path``."""
    import highdicom
    import pydicom

    datasets = []
    for file in files:
        ds = pydicom.dcmread(file)
        ds.decompress()
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID  # the shared anonymised series left it empty
        datasets.append(ds)
    enhanced = highdicom.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=datasets, series_instance_uid=pydicom.uid.generate_uid(), series_number=99,
        sop_instance_uid=pydicom.uid.generate_uid(), instance_number=1,
    )
    enhanced.save_as(path)
    return path
