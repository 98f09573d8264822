"""Where `correct` writes: the output format a name asks for, the companion files beside it, and
the checks that an output could be written, made before any heavy work."""

from __future__ import annotations

from pathlib import Path

from medinpaint.data.atomic import check_writable
from medinpaint.data.load import ITK_SUFFIXES, NIFTI_SUFFIXES
from medinpaint.errors import MedinpaintError


def output_format(path: str | Path) -> str:
    """nifti, nrrd or mha from the file name; dicom for a folder (a path without extension)."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    for suffix, fmt in ITK_SUFFIXES.items():
        if name.endswith(suffix) and suffix in (".nrrd", ".mha"):
            return fmt
    if path.is_dir() or path.suffix == "":
        return "dicom"
    raise MedinpaintError(
        f"{path}: cannot tell the output format; end the name with .nii.gz, .nii, .nrrd or .mha, "
        "or give a folder name for a DICOM series"
    )


def split_name(path: Path) -> tuple[str, str]:
    """('scan', '.nii.gz') for scan.nii.gz."""
    name = path.name
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha"):
        if name.lower().endswith(ext):
            return name[: -len(ext)], name[-len(ext):]
    return path.stem, path.suffix


def companion_paths(output: str | Path) -> dict[str, Path]:
    """Where each output of ``correct`` goes, so callers (and batch resume) can find them."""
    output = Path(output)
    if output_format(output) == "dicom":
        return {
            "volume": output,
            "mask": output / "synthesized_mask.nii.gz",
            "seg": output / "synthesized_mask_seg.dcm",
            "uncertainty": output / "uncertainty.nii.gz",
            "provenance": output / "provenance.json",
        }
    stem, ext = split_name(output)
    return {
        "volume": output,
        "mask": output.with_name(f"{stem}_desc-synthesized_mask{ext}"),
        "uncertainty": output.with_name(f"{stem}_desc-uncertainty{ext}"),
        "provenance": output.with_name(f"{stem}.json"),
    }


def check_outputs(output: str | Path, overwrite: bool = False) -> None:
    """Fail early (before loading and inference) on a ``correct`` output that could not be written."""
    output = Path(output)
    if output_format(output) == "dicom":
        check_writable(output, overwrite, is_dir=True)
        return
    paths = companion_paths(output)
    check_files([paths["volume"], paths["mask"], paths["provenance"]], overwrite)


def check_files(paths: list[Path], overwrite: bool = False) -> None:
    for path in paths:
        check_writable(path, overwrite)


def file_pair(output: str | Path, companion: str, what: str) -> tuple[Path, Path, str]:
    """(output, its companion file, format) for commands that write a file and one beside it.

    ``companion`` is ``json`` (a ``<stem>.json`` summary) or a BIDS ``desc`` label.
    """
    output = Path(output)
    fmt = output_format(output)
    if fmt == "dicom":
        raise MedinpaintError(f"{output}: {what} is written as a file; end the name with .nii.gz, .nrrd or .mha")
    stem, ext = split_name(output)
    second = output.with_name(f"{stem}.json" if companion == "json" else f"{stem}_desc-{companion}{ext}")
    return output, second, fmt
