"""SHA-256 of files, read in blocks: how models and inputs are identified in provenance."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

BLOCK = 1 << 20  # 1 MiB reads: a scan or a model never has to fit in memory at once


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of one file's bytes."""
    return sha256_files([path])


def sha256_files(paths: Iterable[str | Path]) -> str:
    """Hex SHA-256 of the files' bytes read one after the other (a DICOM series in slice order)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(BLOCK), b""):
                digest.update(block)
    return digest.hexdigest()
