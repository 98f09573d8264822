"""Dataset mode: correct many cases, resumably, with failures recorded and shards for job arrays.

Loading (and artifact detection) of the next cases and writing of finished ones run in
worker threads while the current case is being filled, so the accelerator is not idle
while files are read.  A case counts as done only when its provenance (written last)
exists and records the SHA-256 of the current input; anything else is redone.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from medinpaint.artifacts.find import find_artifacts
from medinpaint.config import Settings
from medinpaint.correct import correct
from medinpaint.data.atomic import StagedOutputs
from medinpaint.data.find import find_cases
from medinpaint.data.load import load
from medinpaint.errors import MedinpaintError
from medinpaint.output import companion_paths, output_format, save
from medinpaint.provenance import input_sha256

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


def is_complete(case: Case, output: Path, digest: str | None) -> bool:
    paths = companion_paths(output)
    try:
        provenance = json.loads(paths["provenance"].read_text())
    except (OSError, ValueError):
        return False
    if provenance.get("Sources", [{}])[0].get("SHA256") != digest:
        return False
    base = output if output_format(output) == "dicom" else output.parent  # provenance names masks relative to this
    return paths["volume"].exists() and all((base / m).exists() for m in provenance.get("SynthesizedMask", []))


def clean_partials(folder: Path) -> int:
    """Remove staging leftovers of a killed run (they are never results)."""
    removed = 0
    for p in [*folder.glob(".*.partial-*"), *folder.glob(".*.old-*")]:
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
    workers: int = 2,
    report: bool = False,
    progress: bool = True,
) -> list[CaseResult]:
    settings = settings or Settings()
    index, count = shard
    mine = [c for i, c in enumerate(cases) if i % count == index]
    out_dir.mkdir(parents=True, exist_ok=True)
    clean_partials(out_dir)
    results: list[CaseResult] = []

    def output_of(case: Case) -> Path:
        return out_dir / (case.case if suffix == "dicom" else case.case + suffix)

    def prepare(case: Case):
        """Worker: load, hash, check resume, detect; returns what the main loop needs."""
        started = time.perf_counter()
        volume = load(case.input, series=case.series)
        digest = input_sha256(volume)
        if is_complete(case, output_of(case), digest):
            return "skipped", None, None, time.perf_counter() - started
        artifacts = find_artifacts(volume, slice_settings=settings.slices, metal_settings=settings.metal)
        return "todo", volume, artifacts, time.perf_counter() - started

    def write(case: Case, correction, started: float) -> CaseResult:
        written = save(correction, output_of(case), overwrite=True)
        if report:
            from medinpaint.report import write_case_png

            write_case_png(correction, out_dir / "report" / f"{case.case}.png")
        synthesized = correction.synthesized
        return CaseResult(
            case.case, str(case.input), "done",
            artifacts=";".join(f"{k}:{v}" for k, v in correction.artifacts.counts().items()) or "none",
            synthesized_fraction=float((synthesized > 0).mean()),
            seconds=time.perf_counter() - started, output=str(written["volume"]),
        )

    bar = tqdm(total=len(mine), desc=f"batch{'' if count == 1 else f' shard {index}/{count}'}", unit="case", disable=not progress)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as loaders, ThreadPoolExecutor(max_workers=1) as writers:
        pending: list[tuple[Case, Future]] = []
        writes: list[tuple[Case, Future]] = []
        queue = list(mine)
        while queue or pending:
            while queue and len(pending) < max(1, workers):
                case = queue.pop(0)
                pending.append((case, loaders.submit(prepare, case)))
            case, job = pending.pop(0)
            started = time.perf_counter()
            try:
                status, volume, artifacts, load_seconds = job.result()
                if status == "skipped":
                    results.append(CaseResult(case.case, str(case.input), "skipped", output=str(output_of(case)),
                                              reason="complete output with matching input SHA-256"))
                else:
                    correction = correct(volume, artifacts, method=method, model=model, metal_model=metal_model,
                                         settings=settings, device=device)
                    writes.append((case, writers.submit(write, case, correction, started - load_seconds)))
            except (MedinpaintError, OSError) as exc:
                results.append(CaseResult(case.case, str(case.input), "failed", reason=_one_line(exc)))
            except Exception as exc:  # a bug on one case must not stop a dataset run; it is recorded as such
                results.append(CaseResult(case.case, str(case.input), "failed", reason=f"internal error: {type(exc).__name__}: {_one_line(exc)}"))
            results.extend(_collect(writes, block=False))
            bar.update(1)
        results.extend(_collect(writes, block=True))
    bar.close()
    return sorted(results, key=lambda r: r.case)


def _collect(writes: list, block: bool) -> list[CaseResult]:
    done = []
    for item in list(writes):
        case, future = item
        if block or future.done():
            writes.remove(item)
            try:
                done.append(future.result())
            except (MedinpaintError, OSError) as exc:
                done.append(CaseResult(case.case, str(case.input), "failed", reason=_one_line(exc)))
            except Exception as exc:
                done.append(CaseResult(case.case, str(case.input), "failed", reason=f"internal error: {type(exc).__name__}: {_one_line(exc)}"))
    return done


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
