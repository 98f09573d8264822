"""All-or-nothing output: files are staged beside their targets and renamed into place.

A crash or an error leaves either the complete previous state or the complete new
outputs, never a half-written file that a later run could mistake for a result.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

from medinpaint.errors import MedinpaintError


def check_writable(final: str | Path, overwrite: bool = False, is_dir: bool = False) -> None:
    """Fail before any heavy work if ``final`` could not be written (really tries, so it holds for root too)."""
    with StagedOutputs(overwrite=overwrite) as probe:
        probe.path_for(final, is_dir=is_dir)
        probe.discard()


_shard_tag = ""  # set by batch runs ("0of4"): leftovers of an earlier run of the same shard are provably stale
_STAGED = re.compile(r"^\.(?P<name>.+)\.(?:partial|old)-(?P<pid>\d+)@(?P<host>[A-Za-z0-9._]+)(?:\+(?P<shard>[A-Za-z0-9]+))?(?:-|$)")


def set_shard_tag(tag: str) -> None:
    """Mark this process's staging names with its shard (letters and digits), e.g. ``0of4``."""
    global _shard_tag
    if not re.fullmatch(r"[A-Za-z0-9]*", tag):
        raise ValueError(f"shard tag {tag!r}: letters and digits only")
    _shard_tag = tag


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def owner() -> str:
    """Who stages a file: ``pid@host`` (+ shard), so a clean-up can tell its own leftovers from a live run's files."""
    return f"{os.getpid()}@{_host()}" + (f"+{_shard_tag}" if _shard_tag else "")


def staging_owner(name: str) -> dict | None:
    """pid, host and shard of a staging leftover's name (None: not one of ours, or from before owners were recorded)."""
    match = _STAGED.match(name)
    return None if match is None else {"pid": int(match["pid"]), "host": match["host"], "shard": match["shard"] or ""}


def is_stale(name: str) -> bool:
    """True only when no running process can still be writing this leftover.

    Same shard tag: an earlier run of this very shard. Same host: its process is gone. A file of
    another host, of another shard, or without an owner is kept (it may be a live run's).
    """
    found = staging_owner(name)
    if found is None:
        return False
    if _shard_tag and found["shard"] == _shard_tag:
        return True
    if found["host"] != _host():
        return False
    if found["pid"] == os.getpid():
        return True  # this process stages inside ``with StagedOutputs``; anything left at a clean-up is a leftover
    return not _process_alive(found["pid"])


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


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
        prefix = f".{final.name}.partial-{owner()}-"
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
        """Rename each staged output into place, in staging order, each flushed to disk before its rename.

        fsync before rename: otherwise a power cut can leave the new name pointing at an empty
        file; the folder is synced after each rename so the name itself is durable.
        """
        for tmp, final in self._staged:
            os.chmod(tmp, 0o755 if tmp.is_dir() else 0o644)
            _fsync_tree(tmp)
            if final.is_dir() and not final.is_symlink():
                # A folder cannot be replaced in one rename: move the old one aside first, so the
                # name only ever shows the complete old or the complete new outputs.
                old = final.with_name(f".{final.name}.old-{owner()}")
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


def _fsync_tree(path: Path) -> None:
    """fsync a staged file, or every file inside a staged folder and then the folders themselves."""
    if path.is_dir():
        for root, _, files in os.walk(path):
            for name in files:
                _fsync_file(Path(root) / name)
        for root, _, _ in os.walk(path, topdown=False):
            _fsync_dir(Path(root))
    else:
        _fsync_file(path)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
