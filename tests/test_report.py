"""QA reports: one self-contained HTML page per case and a batch index, checked as text and in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

import medinpaint
from medinpaint.artifacts.find import ArtifactMask
from medinpaint.artifacts.labels import ArtifactKind
from medinpaint.cli.main import main
from medinpaint.correct import Correction
from medinpaint.data.save import write_file
from medinpaint.data.volume import Volume
from medinpaint.report import write_case_report
from medinpaint.report.case import GATE_KEYS, find_keys
from medinpaint.report.views import cuts, windows

from conftest import shared

BLANKED = (9, 20)  # k of the crop's blanked slices
DATA_URI = re.compile(r"src='(data:image/png;base64,[^']+)'")


def _crop(tmp_path, name: str, blanked=BLANKED):
    """A 80 x 80 x 32 crop of the real 3 mm CT (above its hip implant) with whole slices blanked to -1024 HU."""
    ct = medinpaint.load(shared("ct_abdomen_3mm.nii.gz"))
    array = ct.array[20:100, 10:90, 30:62].copy()
    array[:, :, list(blanked)] = -1024
    affine = ct.affine.copy()
    affine[:3, 3] = ct.affine[:3, :3] @ [20, 10, 30] + ct.affine[:3, 3]
    path = tmp_path / name
    write_file(Volume(array, affine, modality="CT"), path, "nifti", "int16")
    return path


@pytest.fixture(scope="module")
def corrected(tmp_path_factory):
    """``correct --report`` on the crop: (output folder, report path, provenance)."""
    folder = tmp_path_factory.mktemp("correct")
    source = _crop(folder, "crop.nii.gz")
    code = main(["--quiet", "correct", str(source), str(folder / "fixed.nii.gz"), "--method", "classical",
                 "--artifacts", "slices", "--report"])
    assert code == 0
    return folder, folder / "fixed_report.html", json.loads((folder / "fixed.json").read_text())


@pytest.fixture(scope="module")
def batch_run(tmp_path_factory):
    """``batch --report`` over two crops and one truncated file, then run again (both done cases skipped)."""
    root = tmp_path_factory.mktemp("batch")
    data = root / "in"
    data.mkdir()
    _crop(data, "case_a.nii.gz", (9, 20))
    _crop(data, "case_b.nii.gz", (5, 6, 7, 25))
    (data / "broken.nii.gz").write_bytes((data / "case_a.nii.gz").read_bytes()[:4000])
    out = root / "out"
    args = ["--quiet", "batch", str(data), str(out), "--method", "classical", "--report"]
    first = main(args)
    pages = {c: (out / "report" / f"{c}.html") for c in ("case_a", "case_b")}
    first_index = (out / "report" / "index.html").read_text()
    stamps = {c: p.stat().st_mtime_ns for c, p in pages.items()}
    second = main(args)
    return out, first, second, first_index, stamps


def _images(page: str) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) for uri in DATA_URI.findall(page)]


def test_case_report_is_self_contained_and_shows_the_case(corrected):
    folder, report, provenance = corrected
    page = report.read_text()
    # Self-contained: nothing fetched from the network or from other files.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page)
    assert "<link" not in page and "@import" not in page and "url(" not in page
    assert len(re.findall(r"<img\b", page)) == len(DATA_URI.findall(page)) == 15  # 3 planes x (before, after, overlay, fader pair)
    assert all(im.size[0] > 10 and im.size[1] > 10 for im in _images(page))
    for plane in ("axial", "coronal", "sagittal"):
        assert f"{plane} (" in page
    axial = int(re.search(r"axial \(k = (\d+)\)", page)[1])
    assert axial in BLANKED  # the slice that changed most is a filled one
    assert "type='range'" in page and ">flicker<" in page
    voxels = provenance["SynthesizedVoxels"]
    assert voxels["by_kind"]["blank_slice"]["count"] == 2 * 80 * 80
    assert f"{voxels['fraction']:.4%}" in page and f">{voxels['count']}<" in page
    assert provenance["Sources"][0]["SHA256"] in page
    assert "classical" in page and "Gate decisions" in page and "Warnings" in page
    assert "fixed_report.html" not in provenance.get("Files", {}).values()  # written after the provenance (README)


def test_existing_report_needs_overwrite_and_nothing_is_written(cli, tmp_path):
    source = _crop(tmp_path, "crop.nii.gz")
    (tmp_path / "fixed_report.html").write_text("old")
    code, _, err = cli("--quiet", "correct", source, tmp_path / "fixed.nii.gz", "--method", "classical", "--report")
    assert code == 2 and err.startswith("error:") and "fixed_report.html" in err and "Traceback" not in err
    assert not (tmp_path / "fixed.nii.gz").exists() and (tmp_path / "fixed_report.html").read_text() == "old"


def test_dicom_folder_output_gets_its_report_inside(cli, tmp_path):
    source = _crop(tmp_path, "crop.nii.gz")
    code, _, err = cli("--quiet", "correct", source, tmp_path / "fixed", "--method", "classical", "--artifacts", "slices", "--report")
    assert code == 0, err
    page = (tmp_path / "fixed" / "report.html").read_text()
    provenance = json.loads((tmp_path / "fixed" / "provenance.json").read_text())
    assert provenance["Sources"][0]["SHA256"] in page and "medinpaint QA: fixed<" in page
    assert not list(tmp_path.glob("*report*")) and not list((tmp_path / "fixed").glob(".*partial*"))


def test_planes_keep_physical_proportions_and_radiological_orientation():
    """MR with 6.5 mm slices: displayed sizes follow the spacing; a marker at right-anterior-superior is top left."""
    mr = medinpaint.load(shared("mr_brain_t1.nrrd"))
    labels = np.zeros(mr.shape, np.uint8)
    k = mr.shape[2] // 2
    labels[:, :, k] = ArtifactKind.BLANK_SLICE
    shown = windows(mr.modality, mr.array, has_metal=False)
    assert len(shown) == 1 and shown[0].lo < shown[0].hi  # percentiles, not a CT window
    found = {c.plane: c for c in cuts(mr.array, mr.array, labels, labels > 0, mr.affine, shown)}
    spacing = {}
    ornt_axes = np.abs(mr.affine[:3, :3]).argmax(axis=0)  # voxel axis -> nearest RAS axis
    for axis, s in enumerate(mr.spacing):
        spacing[int(ornt_axes[axis])] = (s, mr.shape[axis])
    mm = {ras: s * n for ras, (s, n) in spacing.items()}  # extent along R, A, S
    for plane, (across, down) in {"axial": (0, 1), "coronal": (0, 2), "sagittal": (1, 2)}.items():
        cut = found[plane]
        assert cut.height / cut.width == pytest.approx(mm[down] / mm[across], rel=0.03), plane

    # LPS-stored synthetic volume: i runs to the patient's left, j to posterior.
    array = np.zeros((20, 30, 10), np.float32)
    array[0, 0, 9] = 1000.0  # most right, most anterior, most superior
    affine = np.diag([-2.0, -1.0, 3.0, 1.0])
    mask = np.zeros(array.shape, bool)
    mask[:, :, 9] = True
    picture = {c.plane: c for c in cuts(array, array, mask.astype(np.uint8) * 2, mask, affine, windows("CT", array, False))}
    axial = np.asarray(Image.open(io.BytesIO(base64.b64decode(picture["axial"].before.split(",", 1)[1]))).convert("L"))
    row, col = np.unravel_index(np.argmax(axial), axial.shape)
    assert row < axial.shape[0] * 0.2 and col < axial.shape[1] * 0.2  # top left: anterior up, patient's right on the left


def test_api_report_without_provenance_says_nothing_was_synthesized(tmp_path):
    mr = medinpaint.load(shared("mr_brain_t1.nrrd"))
    nothing = ArtifactMask(np.zeros(mr.shape, np.uint8), mr.affine)
    correction = Correction(volume=mr, original=mr, artifacts=nothing, method="classical", model=None, parameters={}, seconds=0.5)
    page = write_case_report(correction, tmp_path / "mr.html").read_text()
    assert "nothing was synthesized" in page and "percentiles 0.5-99.5" in page
    middle = mr.shape[2] // 2
    assert f"axial (k = {middle})" in page  # no synthesized voxel: the middle cuts


def test_gate_entries_are_found_wherever_the_provenance_puts_them():
    record = {"Parameters": {"gate": {"slices": 0.7}, "metal": {"adaptive_blend": True}}, "Run": [{"kept_voxels": 3}],
              "Method": "network"}
    assert [p for p, _ in find_keys(record, GATE_KEYS)] == ["Parameters.gate", "Parameters.metal.adaptive_blend", "Run[0].kept_voxels"]


def test_metal_case_adds_a_bone_window_cut_through_the_metal():
    ct = medinpaint.load(shared("ct_abdomen_3mm.nii.gz"))
    array = ct.array[:, :, :24]
    metal = array > 2500  # the real hip implant in the lowest slices
    assert metal.any()
    labels = np.where(metal, ArtifactKind.METAL, 0).astype(np.uint8)
    shown = windows("CT", array, has_metal=True)
    assert [w.lo for w in shown] == [-160.0, -500.0]
    found = [c for c in cuts(array, array, labels, np.zeros_like(metal), ct.affine, shown) if c.window == shown[1]]
    axial = next(c for c in found if c.plane == "axial")
    assert metal[:, :, axial.index].any()


def test_batch_index_lists_every_case_and_keeps_reports_of_skipped_ones(batch_run):
    out, first, second, first_index, stamps = batch_run
    assert first == second == 3  # the truncated file fails both times
    index = (out / "report" / "index.html").read_text()
    for page in (first_index, index):
        assert "href='case_a.html'" in page and "href='case_b.html'" in page
        assert "broken" in page and "status-failed" in page
        assert len(re.findall(r"<circle\b", page)) == 2 * 2  # two strips, one dot per case with numbers
    summary = json.loads((out / "summary.json").read_text())
    reason = next(c["reason"] for c in summary["cases"] if c["case"] == "broken")
    assert reason and reason.split(":")[0] in index
    fraction_b = json.loads((out / "case_b.json").read_text())["SynthesizedVoxels"]["fraction"]
    assert f"{fraction_b:.4%}" in first_index and f"{fraction_b:.4%}" in index  # the skipped case keeps its numbers
    assert "(earlier run)" in index and "(earlier run)" not in first_index
    for case, stamp in stamps.items():
        assert (out / "report" / f"{case}.html").stat().st_mtime_ns == stamp  # skipped: the old report is kept
    assert not list((out / "report").glob("broken*"))


# --- in a real browser ---------------------------------------------------------------------------------------------

PROBE = """<script>window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images), out = {images: imgs.length,
    loaded: imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length};
  var box = document.querySelector('.cmp');
  if (box) {
    var range = box.querySelector('input'); range.value = 0; range.dispatchEvent(new Event('input'));
    out.fadedOpacity = box.querySelector('img.top').style.opacity;
    box.querySelector('button').click(); out.flickerLabel = box.querySelector('button').textContent;
  }
  var table = document.getElementById('cases');
  if (table) {
    table.querySelectorAll('th')[3].click();
    out.secondsAscending = Array.prototype.map.call(table.tBodies[0].rows, function (r) { return +r.cells[3].dataset.sort; });
    out.dots = document.querySelectorAll('svg.strip circle').length;
  }
  var pre = document.createElement('pre'); pre.id = 'qa-probe'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});</script>"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no chromium binary on PATH (make test installs it with apt-get when run as root)")


def _in_browser(page_path, tmp_path) -> dict:
    probe = tmp_path / f"probe_{page_path.name}"
    probe.write_text(page_path.read_text().replace("</body>", PROBE + "</body>"))
    run = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    found = re.search(r"<pre id=\"qa-probe\">(.*?)</pre>", run.stdout)
    assert found, f"chromium printed no probe result (exit {run.returncode}): {run.stderr[-2000:]}"
    return json.loads(found[1].replace("&quot;", '"'))


def test_case_report_in_headless_chromium(corrected, tmp_path):
    _, report, _ = corrected
    result = _in_browser(report, tmp_path)
    assert result["images"] == 15 and result["loaded"] == 15
    assert result["fadedOpacity"] == "0" and result["flickerLabel"] == "stop"


def test_index_in_headless_chromium(batch_run, tmp_path):
    out = batch_run[0]
    result = _in_browser(out / "report" / "index.html", tmp_path)
    assert result["images"] == result["loaded"]
    assert result["dots"] == 4
    seconds = result["secondsAscending"]
    assert len(seconds) == 3 and seconds == sorted(seconds) and seconds[0] == -1  # the failed case (no time) first
