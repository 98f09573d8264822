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
from medinpaint.data.atomic import StagedOutputs
from medinpaint.data.output_names import companion_paths, file_pair, output_format
from medinpaint.data.save import storable_array, write_file
from medinpaint.data.volume import Volume
from medinpaint.errors import MedinpaintError
from medinpaint.provenance import correction_provenance, input_sha256

SYNTHESIZED_NOTE = "medinpaint: contains synthesized voxels (see mask)"


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
            provenance = correction_provenance(correction, synthesized, written, relative_to=output.parent)
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
    provenance = correction_provenance(correction, synthesized, written, relative_to=paths["volume"])
    _write_json(provenance, folder / paths["provenance"].name)
    written["provenance"] = paths["provenance"]
    return written


def _uncertainty_map(correction: Correction) -> np.ndarray:
    spread = np.zeros(correction.volume.shape, dtype=np.float32)
    holes = correction.artifacts.synthesized
    spread[holes] = correction.uncertainty[holes]
    return spread


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
