"""``save``: write a correction (volume, synthesized mask, provenance) so nobody mistakes it for a measurement.

Every output is staged under a temporary name and renamed into place; the provenance
sidecar is renamed last, so its presence means the outputs it names are complete.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medinpaint import __version__
from medinpaint.artifacts.find import ArtifactMask
from medinpaint.artifacts.labels import LABEL_NAMES
from medinpaint.correct import Correction
from medinpaint.data.atomic import StagedOutputs, check_writable
from medinpaint.data.load import ITK_SUFFIXES, NIFTI_SUFFIXES
from medinpaint.data.save import storable_array, write_file
from medinpaint.data.volume import Volume
from medinpaint.errors import MedinpaintError
from medinpaint.provenance import build_provenance, detection_used, input_sha256, run_block

SYNTHESIZED_NOTE = "medinpaint: contains synthesized voxels (see mask)"


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


def save(correction: Correction, output: str | Path, overwrite: bool = False) -> dict[str, Path]:
    """Write the corrected volume, its synthesized mask and the provenance; return the paths written."""
    output = Path(output)
    fmt = output_format(output)
    paths = companion_paths(output)
    original = correction.original
    if original.source is not None and output.resolve() == Path(original.source.path).resolve():
        raise MedinpaintError(f"{output}: is the input; medinpaint never overwrites its input")
    synthesized = correction.synthesized
    dtype = original.source.stored_dtype if original.source else None
    written: dict[str, Path] = {}
    with StagedOutputs(overwrite=overwrite) as staged:
        if fmt == "dicom":
            folder = staged.path_for(output, is_dir=True)
            written = _write_dicom_folder(correction, folder, synthesized, paths)
        else:
            write_file(correction.volume, staged.path_for(paths["volume"]), fmt, dtype, SYNTHESIZED_NOTE)
            write_file(correction.volume.with_array(synthesized), staged.path_for(paths["mask"]), fmt, "uint8",
                       "medinpaint synthesized-voxel labels")
            written = {"volume": paths["volume"], "mask": paths["mask"]}
            if correction.uncertainty is not None:
                write_file(correction.volume.with_array(_uncertainty_map(correction)),
                           staged.path_for(paths["uncertainty"]), fmt, None, "medinpaint fill uncertainty")
                written["uncertainty"] = paths["uncertainty"]
            provenance = _provenance(correction, synthesized, written, relative_to=output.parent)
            _write_json(provenance, staged.path_for(paths["provenance"]))
            written["provenance"] = paths["provenance"]
    return written


def _write_dicom_folder(correction: Correction, folder: Path, synthesized: np.ndarray, paths: dict) -> dict[str, Path]:
    from medinpaint.data.dicom_writer import write_dicom_series, write_seg

    original = correction.original
    dtype = original.source.stored_dtype if original.source else None
    # Integer inputs stay integer, so acquired voxels are stored exactly (slope 1, intercept 0).
    volume = correction.volume.with_array(storable_array(correction.volume.array, dtype).astype(np.float32))
    images = write_dicom_series(
        volume, folder, synthesized,
        description=f"medinpaint {correction.method} inpainting; synthesized voxels listed in synthesized_mask_seg.dcm",
    )
    written = {"volume": paths["volume"]}
    if synthesized.any():
        write_seg(images, synthesized, folder / paths["seg"].name)
        written["seg"] = paths["seg"]
    mask_volume = correction.volume.with_array(synthesized)
    write_file(mask_volume, folder / paths["mask"].name, "nifti", "uint8", "medinpaint synthesized-voxel labels")
    written["mask"] = paths["mask"]
    if correction.uncertainty is not None:
        write_file(correction.volume.with_array(_uncertainty_map(correction)), folder / paths["uncertainty"].name,
                   "nifti", None, "medinpaint fill uncertainty")
        written["uncertainty"] = paths["uncertainty"]
    provenance = _provenance(correction, synthesized, written, relative_to=paths["volume"])
    _write_json(provenance, folder / paths["provenance"].name)
    written["provenance"] = paths["provenance"]
    return written


def _uncertainty_map(correction: Correction) -> np.ndarray:
    spread = np.zeros(correction.volume.shape, dtype=np.float32)
    holes = correction.artifacts.synthesized
    spread[holes] = correction.uncertainty[holes]
    return spread


def _provenance(correction: Correction, synthesized: np.ndarray, written: dict[str, Path], relative_to: Path) -> dict:
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


def save_mask(artifacts: ArtifactMask, volume: Volume, output: str | Path, overwrite: bool = False) -> dict[str, Path]:
    """Write the labelled artifact mask (all kinds, metal included) and a JSON summary beside it."""
    output, summary_path, fmt = file_pair(output, "json", "the mask")
    with StagedOutputs(overwrite=overwrite) as staged:
        write_file(volume.with_array(artifacts.labels), staged.path_for(output), fmt, "uint8", "medinpaint artifact labels")
        summary = {
            "GeneratedBy": [{"Name": "medinpaint", "Version": __version__}],
            "Source": str(volume.source.path) if volume.source else None,
            "SourceSHA256": input_sha256(volume),
            "Labels": {str(k): v for k, v in LABEL_NAMES.items()},
            "Artifacts": artifacts.summary(),
        }
        _write_json(summary, staged.path_for(summary_path))
    return {"mask": output, "summary": summary_path}


def _write_json(data: dict, path: Path) -> None:
    path.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (Path,)):
        return str(value)
    if isinstance(value, (tuple, set, np.ndarray)):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
