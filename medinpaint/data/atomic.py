"""All-or-nothing output: files are staged beside their targets and renamed into place.

A crash or an error leaves either the complete previous state or the complete new
outputs, never a half-written file that a later run could mistake for a result.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from medinpaint.errors import MedinpaintError


def check_writable(final: str | Path, overwrite: bool = False, is_dir: bool = False) -> None:
    """Fail before any heavy work if ``final`` could not be written (really tries, so it holds for root too)."""
    with StagedOutputs(overwrite=overwrite) as probe:
        probe.path_for(final, is_dir=is_dir)
        probe.discard()


class StagedOutputs:
    """Collect outputs under temporary names; ``commit()`` renames them all, in order."""

    def __init__(self, overwrite: bool = False) -> None:
        self.overwrite = overwrite
        self._staged: list[tuple[Path, Path]] = []  # (temporary, final)

    def path_for(self, final: str | Path, is_dir: bool = False) -> Path:
        """A temporary sibling of ``final`` to write into (a folder if ``is_dir``)."""
        final = Path(final)
        empty_dir = is_dir and final.is_dir() and not any(final.iterdir())
        if final.exists() and not self.overwrite and not empty_dir:
            raise MedinpaintError(f"{final}: already exists (pass --overwrite to replace it)")
        parent = final.parent
        if not parent.is_dir():
            raise MedinpaintError(f"{parent}: output folder does not exist")
        if not os.access(parent, os.W_OK):
            raise MedinpaintError(f"{parent}: output folder is not writable")
        prefix = f".{final.name}.partial-"
        try:
            if is_dir:
                tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
            else:
                fd, name = tempfile.mkstemp(prefix=prefix, suffix=_suffix(final), dir=parent)
                os.close(fd)
                tmp = Path(name)
        except OSError as exc:
            raise MedinpaintError(f"{parent}: cannot create files in this folder ({exc.strerror})") from None
        self._staged.append((tmp, final))
        return tmp

    def commit(self) -> None:
        for tmp, final in self._staged:
            os.chmod(tmp, 0o755 if tmp.is_dir() else 0o644)
            if final.is_dir() and not final.is_symlink():
                # A folder cannot be replaced in one rename: move the old one aside first, so the
                # name only ever shows the complete old or the complete new outputs.
                old = final.with_name(f".{final.name}.old-{os.getpid()}")
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            _fsync_dir(final.parent)
        self._staged.clear()

    def discard(self) -> None:
        for tmp, _ in self._staged:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
        self._staged.clear()

    def __enter__(self) -> "StagedOutputs":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def _suffix(path: Path) -> str:
    """Keep the full extension so writers that dispatch on it (SimpleITK, nibabel) still work."""
    name = path.name.lower()
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha", ".json", ".dcm", ".png", ".csv", ".html"):
        if name.endswith(ext):
            return ext
    return path.suffix


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
