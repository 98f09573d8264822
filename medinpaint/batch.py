"""Dataset mode: correct many cases, resumably, with failures recorded and shards for job arrays.

The steps of one case (prepare: load, hash, resume check, detect; correct; write) are plain
functions here, called by every engine (``medinpaint.engines``: local threads, Ray), so the
resume and summary rules exist once.  A case counts as done only when its provenance (written
last) records the SHA-256 of the current input *and* this run's settings (method, models,
detection, inference, mask, output format); anything else is redone, and the summary says why.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from medinpaint.config import Settings
from medinpaint.correct import Correction, correct, detect
from medinpaint.data.atomic import StagedOutputs, is_stale, set_shard_tag
from medinpaint.data.find import find_cases
from medinpaint.data.load import format_of, load
from medinpaint.data.volume import Volume
from medinpaint.errors import MedinpaintError
from medinpaint.data.output_names import companion_paths, output_format
from medinpaint.output import save
from medinpaint.provenance import input_sha256, run_settings, why_redo

SUMMARY_FIELDS = ("case", "input", "status", "artifacts", "synthesized_fraction", "seconds", "output", "reason")


@dataclass
class Case:
    case: str  # a file-name-safe id, unique in the run
    input: Path
    series: str | None = None


@dataclass
class CaseResult:
    case: str
    input: str
    status: str  # done | skipped | failed
    artifacts: str = ""
    synthesized_fraction: float = 0.0
    seconds: float = 0.0
    output: str = ""
    reason: str = ""
    extra: dict = field(default_factory=dict)


def parse_shard(text: str | None) -> tuple[int, int]:
    """'I/N' (0-based I) -> (I, N); None -> this process's torchrun rank and world size, else (0, 1)."""
    if text is None:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or not 0 <= int(match[1]) < int(match[2]):
        raise MedinpaintError(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. 0/4")
    return int(match[1]), int(match[2])


def list_cases(source: Path) -> list[Case]:
    """Cases from a folder (volume files and DICOM series, recursively) or a CSV manifest with a ``path`` column."""
    if not source.exists():
        raise MedinpaintError(f"{source}: no such file or folder")
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise MedinpaintError(f"{source}: batch INPUT must be a folder or a .csv manifest")
        with open(source, newline="") as fh:
            rows = list(csv.DictReader(fh))
        if not rows or "path" not in rows[0]:
            raise MedinpaintError(f"{source}: the manifest needs a 'path' column (optional: id, series)")
        base = source.parent
        cases = [Case(r.get("id") or _case_id(Path(r["path"]), base), (base / r["path"]).resolve() if not Path(r["path"]).is_absolute() else Path(r["path"]),
                      r.get("series") or None) for r in rows]
    else:
        cases = [Case(_case_id(p, source), p) for p in find_cases(source)]
    seen: set[str] = set()
    for c in cases:
        if c.case in seen:
            raise MedinpaintError(f"two cases map to the same output name {c.case!r}; give ids in a CSV manifest")
        seen.add(c.case)
    return cases


def _case_id(path: Path, base: Path) -> str:
    try:
        rel = path.relative_to(base)
    except ValueError:
        rel = Path(path.name)
    name = str(rel) if str(rel) != "." else path.name
    for ext in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
    return re.sub(r"[^A-Za-z0-9._-]+", "__", name).strip("_") or "case"


@dataclass(frozen=True)
class RunRequest:
    """Everything a worker needs to do one case; picklable, so Ray can ship it to its actors."""

    out_dir: Path
    suffix: str  # ".nii.gz", ".nrrd", ... or "dicom"
    method: str
    settings: Settings
    record: dict  # provenance.run_settings of this run: the resume check compares against it
    model: str | None = None
    metal_model: str | None = None
    device: str | None = None
    artifacts: str = "auto"
    user_mask: str | None = None
    report: bool = False
    shard_tag: str = ""
    slice_spacing: float | None = None


def make_request(out_dir: Path, *, method: str = "network", model: str | None = None, metal_model: str | None = None,
                 device: str | None = None, settings: Settings | None = None, suffix: str = ".nii.gz",
                 artifacts: str = "auto", user_mask: str | None = None, report: bool = False,
                 shard: tuple[int, int] = (0, 1), slice_spacing: float | None = None) -> RunRequest:
    """The request and its run record (an unknown model fails here, once, before any case)."""
    settings = settings or Settings()
    fmt = "dicom" if suffix == "dicom" else output_format(Path("x" + suffix))
    record = run_settings(method=method, settings=settings, output_format=fmt, model=model, metal_model=metal_model,
                          artifacts=artifacts, user_mask=user_mask, device=device, slice_spacing=slice_spacing)
    return RunRequest(out_dir=out_dir, suffix=suffix, method=method, settings=settings, record=record, model=model,
                      metal_model=metal_model, device=device, artifacts=artifacts, user_mask=user_mask, report=report,
                      shard_tag=f"{shard[0]}of{shard[1]}", slice_spacing=slice_spacing)


def output_of(case: Case, request: RunRequest) -> Path:
    return request.out_dir / (case.case if request.suffix == "dicom" else case.case + request.suffix)


def resume_check(output: Path, digest: str | None, record: dict) -> tuple[bool, str]:
    """(skip, reason): skip only a complete output from this input made with this run's settings."""
    paths = companion_paths(output)
    if not paths["provenance"].exists():
        return False, ""  # never finished: nothing to explain
    try:
        provenance = json.loads(paths["provenance"].read_text())
    except (OSError, ValueError):
        return False, "redone: the previous provenance is unreadable"
    reason = why_redo(provenance, digest, record)
    if reason:
        return False, reason
    base = output if output_format(output) == "dicom" else output.parent  # provenance names masks relative to this
    if not paths["volume"].exists() or not all((base / m).exists() for m in provenance.get("SynthesizedMask", [])):
        return False, "redone: the previous output is incomplete"
    return True, "complete output with matching input SHA-256 and run settings"


@dataclass
class Prepared:
    """A loaded case: skipped (with why), or its volume and artifacts to correct."""

    skip: bool
    reason: str
    volume: Volume | None = None
    artifacts: object = None
    seconds: float = 0.0


def prepare_case(case: Case, request: RunRequest) -> Prepared:
    """Load, hash, check resume, detect (runs in a loader thread or a Ray actor)."""
    started = time.perf_counter()
    dicom = request.slice_spacing is not None and format_of(Path(case.input)) == "dicom"
    volume = load(case.input, series=case.series, slice_spacing=request.slice_spacing if dicom else None)  # a grid step means nothing to a file that stores its own grid
    skip, reason = resume_check(output_of(case, request), input_sha256(volume), request.record)
    if skip:
        return Prepared(True, reason, seconds=time.perf_counter() - started)
    settings = request.settings
    artifacts = detect(volume, settings, artifacts=request.artifacts, user_mask=request.user_mask)
    return Prepared(False, reason, volume, artifacts, time.perf_counter() - started)


def load_networks(request: RunRequest) -> dict | None:
    """The models this run would use, loaded once per worker (``correct`` would load them per case)."""
    if request.method != "network":
        return None
    from medinpaint.inpaint.inference import pick_device
    from medinpaint.inpaint.models import DEFAULT_METAL_MODEL, load_model

    device = pick_device(request.device or request.settings.inference.device)
    names = {"slices": request.model, "metal": request.metal_model or DEFAULT_METAL_MODEL}
    return {task: load_model(names[task], device, task=task) for task in request.record["models"]}


def correct_case(prepared: Prepared, request: RunRequest, networks: dict | None = None) -> Correction:
    correction = correct(prepared.volume, prepared.artifacts, method=request.method, model=request.model,
                         metal_model=request.metal_model, settings=request.settings, device=request.device,
                         networks=networks)
    correction.run = request.record  # recorded in the provenance: what the next resume compares against
    return correction


def write_case(case: Case, correction: Correction, request: RunRequest, started: float, reason: str = "") -> CaseResult:
    """Write one finished case (and its QA picture); the one place a finished case leaves the engine."""
    written = save(correction, output_of(case, request), overwrite=True)
    if request.report:
        from medinpaint.report import write_case_report

        write_case_report(correction, request.out_dir / "report" / f"{case.case}.html", written["provenance"], title=case.case)
    synthesized = correction.synthesized
    return CaseResult(
        case.case, str(case.input), "done",
        artifacts=";".join(f"{k}:{v}" for k, v in correction.artifacts.counts().items()) or "none",
        synthesized_fraction=float((synthesized > 0).mean()),
        seconds=time.perf_counter() - started, output=str(written["volume"]), reason=reason,
    )


def skipped_result(case: Case, request: RunRequest, reason: str) -> CaseResult:
    return CaseResult(case.case, str(case.input), "skipped", output=str(output_of(case, request)), reason=reason)


def failed_result(case: Case, exc: BaseException) -> CaseResult:
    """A failed case: bad input says why in one line; anything else is recorded as an internal error."""
    if isinstance(exc, (MedinpaintError, OSError)):
        return CaseResult(case.case, str(case.input), "failed", reason=_one_line(exc))
    return CaseResult(case.case, str(case.input), "failed", reason=f"internal error: {type(exc).__name__}: {_one_line(exc)}")


def process_case(case: Case, request: RunRequest, networks: dict | None = None) -> CaseResult:
    """All steps of one case in sequence; never raises (a failing case is a result, the run goes on)."""
    started = time.perf_counter()
    try:
        prepared = prepare_case(case, request)
        if prepared.skip:
            return skipped_result(case, request, prepared.reason)
        return write_case(case, correct_case(prepared, request, networks), request, started, prepared.reason)
    except Exception as exc:  # a bug on one case must not stop a dataset run; it is recorded as such
        return failed_result(case, exc)


def clean_partials(folder: Path) -> int:
    """Remove staging leftovers that no running process can own (see ``atomic.is_stale``); never a live shard's."""
    removed = 0
    for p in [*folder.glob(".*.partial-*"), *folder.glob(".*.old-*")]:
        if not is_stale(p.name):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed += 1
    return removed


def run_batch(
    cases: list[Case],
    out_dir: Path,
    *,
    shard: tuple[int, int] = (0, 1),
    method: str = "network",
    model: str | None = None,
    metal_model: str | None = None,
    device: str | None = None,
    settings: Settings | None = None,
    suffix: str = ".nii.gz",
    artifacts: str = "auto",
    user_mask: str | None = None,
    workers: int = 2,
    report: bool = False,
    progress: bool = True,
    engine: str = "local",
    address: str | None = None,
    slice_spacing: float | None = None,
) -> list[CaseResult]:
    """Correct this shard's cases with ``engine``; one result per case, sorted by case id."""
    from medinpaint.engines import check_engine, run_engine

    check_engine(engine, address)
    index, count = shard
    mine = [c for i, c in enumerate(cases) if i % count == index]
    request = make_request(out_dir, method=method, model=model, metal_model=metal_model, device=device,
                           settings=settings, suffix=suffix, artifacts=artifacts, user_mask=user_mask, report=report,
                           shard=shard, slice_spacing=slice_spacing)
    out_dir.mkdir(parents=True, exist_ok=True)
    set_shard_tag(request.shard_tag)  # this process's staging names carry the shard while the run lasts
    try:
        clean_partials(out_dir)
        desc = f"batch{'' if count == 1 else f' shard {index}/{count}'}"
        results = run_engine(engine, mine, request, workers=workers, progress=progress, desc=desc, address=address)
    finally:
        set_shard_tag("")
    return sorted(results, key=lambda r: r.case)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def write_summary(results: list[CaseResult], out_dir: Path, name: str = "summary") -> tuple[Path, Path]:
    """``<name>.csv`` and ``<name>.json`` in ``out_dir``, atomically."""
    csv_path, json_path = out_dir / f"{name}.csv", out_dir / f"{name}.json"
    rows = [{k: getattr(r, k) for k in SUMMARY_FIELDS} for r in results]
    with StagedOutputs(overwrite=True) as staged:
        with open(staged.path_for(csv_path), "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=SUMMARY_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        counts = {s: sum(r.status == s for r in results) for s in ("done", "skipped", "failed")}
        staged.path_for(json_path).write_text(json.dumps({"counts": counts, "cases": rows}, indent=2) + "\n")
    return csv_path, json_path


def read_summary(path: Path) -> list[CaseResult]:
    data = json.loads(path.read_text())
    return [CaseResult(**row) for row in data["cases"]]


def merge_shards(out_dir: Path, count: int) -> tuple[list[CaseResult], int]:
    """All shard summaries of an N-way run written so far, and how many shards they cover."""
    results, found = [], 0
    for i in range(count):
        path = out_dir / f"summary-shard-{i}-of-{count}.json"
        if path.exists():
            results.extend(read_summary(path))
            found += 1
    return sorted(results, key=lambda r: r.case), found
