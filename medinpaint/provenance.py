"""The provenance sidecar: BIDS-derivatives style JSON that says which voxels were synthesized, how and from what."""

from __future__ import annotations

import hashlib
import platform
from functools import lru_cache
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from medinpaint import __version__
from medinpaint.artifacts.labels import LABEL_NAMES
from medinpaint.data.volume import Volume

CODE_URL = "https://github.com/medinpaint/medinpaint"


def input_sha256(volume: Volume) -> str | None:
    """SHA-256 of the input: the file, or every file of a DICOM series in slice order."""
    if volume.source is None:
        return None
    files = [f for f in volume.source.slice_files if f is not None] or [volume.source.path]
    paths = [Path(p) for p in dict.fromkeys(files) if not Path(p).is_dir()]  # a multi-frame file appears once per frame
    # Keyed on size and mtime so batch mode hashes each input once (resume check, then provenance).
    return _sha256_of_files(tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths))


@lru_cache(maxsize=64)
def _sha256_of_files(files: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for path, _, _ in files:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


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
