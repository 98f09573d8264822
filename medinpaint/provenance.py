"""The provenance sidecar: BIDS-derivatives style JSON that says which voxels were synthesized, how and from what."""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import asdict
from functools import lru_cache
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medinpaint import __version__
from medinpaint.artifacts.labels import LABEL_NAMES
from medinpaint.data.volume import Volume
from medinpaint.errors import MedinpaintError
from medinpaint.hashing import sha256_files

if TYPE_CHECKING:
    from medinpaint.correct import Correction

CODE_URL = "https://github.com/medinpaint/medinpaint"


def input_sha256(volume: Volume) -> str | None:
    """SHA-256 of the input: the file, or every file of a DICOM series in slice order."""
    if volume.source is None:
        return None
    files = list(volume.source.input_files) or [f for f in volume.source.slice_files if f is not None] or [volume.source.path]
    paths = [Path(p) for p in dict.fromkeys(files) if not Path(p).is_dir()]  # a multi-frame file appears once per frame
    # Keyed on size and mtime so batch mode hashes each input once (resume check, then provenance).
    return _sha256_of_files(tuple(_stat_key(p) for p in paths))


@lru_cache(maxsize=64)
def _sha256_of_files(files: tuple[tuple[str, int, int], ...]) -> str:
    return sha256_files(path for path, _, _ in files)


def synthesized_summary(labels: np.ndarray) -> dict:
    total = int(labels.size)
    values, counts = np.unique(labels[labels > 0], return_counts=True)
    by_kind = {LABEL_NAMES[int(v)]: {"count": int(c), "fraction": float(c) / total} for v, c in zip(values, counts)}
    count = int(counts.sum()) if counts.size else 0
    return {"count": count, "fraction": count / total, "total_voxels": total, "by_kind": by_kind}


def build_provenance(
    *,
    volume: Volume,
    synthesized: np.ndarray,
    method: str,
    model: dict | None,
    parameters: dict,
    artifacts: dict,
    mask_files: list[str],
    extra_files: dict[str, str] | None = None,
    seconds: float,
) -> dict:
    source = volume.source
    return {
        "Name": "medinpaint correction",
        "Description": "Voxels listed in SynthesizedMask were synthesized by medinpaint, not measured.",
        "GeneratedBy": [
            {
                "Name": "medinpaint",
                "Version": __version__,
                "CodeURL": CODE_URL,
                "Description": f"method={method}",
            }
        ],
        "Method": method,
        "Model": model,
        "Parameters": parameters,
        "Sources": [
            {
                "Path": str(source.path) if source else None,
                "Format": source.format if source else None,
                "SeriesInstanceUID": source.series_uid if source else None,
                "SHA256": input_sha256(volume),
            }
        ],
        "SynthesizedMask": mask_files,
        "SynthesizedLabels": {str(k): v for k, v in LABEL_NAMES.items()},
        "SynthesizedVoxels": synthesized_summary(synthesized),
        "ArtifactsFound": artifacts,
        "Geometry": volume.describe() | {"intensity_range": None},
        "Files": extra_files or {},
        "DateTime": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "Seconds": round(seconds, 3),
        "Platform": {"python": platform.python_version(), "machine": platform.machine()},
    }


# --- The run record: what decides a run's output, so a resume can tell whether a finished case still stands.

# Recorded but not compared: where the user mask lies (its bytes count), and what sets speed, not values.
SIGNATURE_IGNORES = ("mask.Path", "inference.threads", "inference.sw_batch_size", "detection.metal.slices_per_batch")
NETWORK_ONLY = ("inference", "gate", "adapt")  # settings sections that only the network method reads
DETECTION = ("slices", "metal")  # settings sections of detection: recorded under "detection" when detection runs


def run_settings(
    *,
    method: str,
    settings,
    output_format: str,
    model: str | None = None,
    metal_model: str | None = None,
    artifacts: str = "auto",
    user_mask: str | Path | None = None,
    uncertainty: bool = False,
    device: str | None = None,
    slice_spacing: float | None = None,
) -> dict:
    """The effective settings of a run, readable, as recorded in every provenance it writes.

    The models are those this run *would* use (a case without metal never loads the metal
    model), so a resume check needs no correction first.
    """
    from medinpaint.inpaint.models import DEFAULT_METAL_MODEL, resolve

    slices_found = user_mask is None and artifacts in ("auto", "slices")
    metal_found = user_mask is None and artifacts in ("auto", "metal")
    models: dict = {}
    if method == "network":
        models["slices"] = _model_identity(resolve(model))
        if metal_found and (metal_model is not None or settings.metal.refine == "network"):
            models["metal"] = _model_identity(resolve(metal_model or DEFAULT_METAL_MODEL))  # as correct() decides
    # Every other settings section counts (a section added later does too, unless listed above).
    config = {name: section for name, section in asdict(settings).items()
              if name not in DETECTION and (method == "network" or name not in NETWORK_ONLY)}
    if "inference" in config:
        config["inference"]["device"] = device or settings.inference.device
    mask = None
    if user_mask is not None:
        mask = {"Path": str(user_mask), "SHA256": _mask_sha256(Path(user_mask))}
    return {
        "method": method,
        "models": models,
        "artifacts": artifacts,
        "mask": mask,
        "detection": {
            **({"slices": asdict(settings.slices)} if slices_found else {}),
            **({"metal": asdict(settings.metal)} if metal_found else {}),
        },
        **config,
        "uncertainty": bool(uncertainty),
        "output_format": output_format,
        "slice_spacing": slice_spacing,  # a DICOM series' grid step when given (--slice-spacing); None = the documented rule
    }


def run_signature(record: dict) -> str:
    """SHA-256 of the canonical JSON of ``record`` (without what does not change the output)."""
    flat = {k: v for k, v in _flatten(record).items() if k not in SIGNATURE_IGNORES}
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()


def run_block(record: dict) -> dict:
    """The provenance's ``Run`` entry."""
    return {"Signature": run_signature(record), "Settings": record}


def detection_used(record: dict, modality: str) -> dict:
    """The detection thresholds that applied to this volume (metal is looked for in CTs only, under auto)."""
    used = dict(record.get("detection") or {})
    if record.get("artifacts") == "auto" and modality != "CT":
        used.pop("metal", None)
    return used


def why_redo(previous: dict, digest: str | None, record: dict) -> str | None:
    """None when ``previous`` (a provenance) was written from this input by a run with these settings, else why not."""
    if previous.get("Sources", [{}])[0].get("SHA256") != digest:
        return "redone: input changed"
    run = previous.get("Run") or {}
    if not run.get("Signature"):
        return "redone: the previous output records no run settings"
    if run["Signature"] == run_signature(record):
        return None
    old, new = _flatten(run.get("Settings") or {}), _flatten(record)
    changed = sorted(k for k in set(old) | set(new) if k not in SIGNATURE_IGNORES and old.get(k) != new.get(k))
    if "method" in changed:
        return f"redone: method changed ({old.get('method')} -> {new.get('method')})"
    models = sorted({k.split(".")[1] for k in changed if k.startswith("models.")})
    if models:
        def name(flat, task):
            return flat.get(f"models.{task}.Name", "none")
        return "redone: model changed (" + ", ".join(f"{t}: {name(old, t)} -> {name(new, t)}" for t in models) + ")"
    return f"redone: settings changed ({', '.join(changed) or 'signature'})"


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        flat: dict = {}
        for k, v in value.items():
            flat |= _flatten(v, f"{prefix}{k}.")
        return flat or ({prefix[:-1]: {}} if prefix else {})
    return {prefix[:-1]: list(value) if isinstance(value, tuple) else value}


def _mask_sha256(path: Path) -> str:
    """A mask file's SHA-256, or that of every file of a mask folder (DICOM) in name order."""
    if not path.exists():
        raise MedinpaintError(f"{path}: mask not found")
    if path.is_dir():
        return sha256_files(sorted(p for p in path.rglob("*") if p.is_file()))
    return _file_sha256(path)


def _model_identity(path: Path) -> dict:
    return {"Name": path.stem, "SHA256": _file_sha256(path)}


def _file_sha256(path: Path) -> str:
    return _sha256_of_files((_stat_key(path.resolve()),))


def _stat_key(path: Path) -> tuple[str, int, int]:
    """What the SHA-256 cache is keyed on: a file changed in place gets a new size or mtime."""
    stat = path.stat()
    return str(path), stat.st_size, stat.st_mtime_ns


def correction_provenance(correction: "Correction", synthesized: np.ndarray, written: dict[str, Path], relative_to: Path) -> dict:
    """The sidecar of a written correction; ``written`` paths are named relative to ``relative_to``."""

    def rel(p: Path) -> str:
        try:
            return str(p.relative_to(relative_to))
        except ValueError:
            return p.name

    masks = [rel(written[k]) for k in ("mask", "seg") if k in written]
    extra = {k: rel(v) for k, v in written.items() if k not in ("mask", "seg")}
    provenance = build_provenance(
        volume=correction.original,
        synthesized=synthesized,
        method=correction.method,
        model=correction.model,
        parameters=correction.parameters,
        artifacts=correction.artifacts.summary(),
        mask_files=masks,
        extra_files=extra,
        seconds=correction.seconds,
    )
    provenance["Models"] = correction.models or {}  # both when slices and metal streaks were filled; "Model" is the first
    if correction.run is not None:
        provenance["UserMask"] = correction.run.get("mask")
        provenance["Detection"] = detection_used(correction.run, correction.original.modality)
        provenance["Run"] = run_block(correction.run)
    if correction.uncertainty is not None:
        holes = correction.artifacts.synthesized
        values = correction.uncertainty[holes]
        provenance["Uncertainty"] = {
            "File": extra.get("uncertainty"),
            "Method": correction.parameters.get("uncertainty"),
            "Units": "same as the volume (standard deviation across test-time flips)",
            "Mean": float(values.mean()) if values.size else 0.0,
            "Max": float(values.max()) if values.size else 0.0,
        }
    return provenance
